"""Contrastive image conditions: the same questions answered with a grey, noised or foreign image, or none.

Usage::

    options = IngestOptions(model="toy-llava", image_condition="blank")
    run_ingest(options, "vrp-lake")  # needs the `image` run of the same options in the lake

Visual attribution compares each layer's truth margin with and without the image (the study's
Δmargin); hallucination detectors such as VCD contrast an answer with its noised-image twin. Both
need the two conditions of one question as rows that join, so every condition is a run of its own:

* ``image``: the question's own image (the default; its ``runs`` row has no ``kind``).
* ``blank``: a uniform grey image (RGB 128) of the original image's size, so the processor resizes
  it exactly as it resized the original and the model sees the same number of image tokens.
* ``noise``: VCD's forward diffusion of the image: ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` on
  pixels scaled to [-1, 1], a linear beta schedule over 1,000 steps (1e-4 to 0.02), ``eps`` seeded
  per sample; the result is clipped back to [0, 255] and rounded, because the processor reads pixels.
* ``mismatch``: the image of another question of the same run, by a seeded cyclic permutation of the
  run's distinct images (a single cycle, so no image maps to itself).
* ``none``: the question alone, no image tokens at all, for families whose processor accepts a
  text-only prompt (``FamilySpec.text_only``).

A condition run's ``runs`` row has ``kind`` = the condition and ``base_run_id`` = the image run with
the same everything else (the run config without its ``condition`` entry hashes to that run's id),
and its samples keep their ``sample_id``. Its ``samples`` rows also carry ``first_token_kl``,
KL(image || condition) of the first-token distributions: the image run's distribution is recomputed
from what that run stored (its last layer's residual through the final norm and the unembedding,
which is exactly the model's logits), so no vocabulary-sized vector is stored for any run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

CONDITIONS: tuple[str, ...] = ("image", "none", "blank", "noise", "mismatch")
GREY = 128
DIFFUSION_STEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02
DEFAULT_NOISE_STEPS = 500


class ConditionError(ValueError):
    """A condition run that cannot start; the message says what to do."""


# ----- pixels --------------------------------------------------------------------------------------
def blank_image(image: Image.Image) -> Image.Image:
    """Uniform grey (RGB 128) at the original image's size."""
    return Image.new("RGB", image.size, (GREY, GREY, GREY))


def alpha_bar(steps: int) -> float:
    """abar_t = prod_{s=1..t} (1 - beta_s) of the linear DDPM schedule (1,000 steps, 1e-4 .. 0.02)."""
    if not 0 <= steps <= DIFFUSION_STEPS:
        raise ConditionError(f"--noise-steps must be between 0 and {DIFFUSION_STEPS}, got {steps}")
    betas = np.linspace(BETA_START, BETA_END, DIFFUSION_STEPS, dtype=np.float64)
    return float(np.prod(1.0 - betas[:steps]))


def sample_rng(seed: int, sample_id: str) -> np.random.Generator:
    """A generator for one sample, independent of batching, sharding and order."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def noise_image(image: Image.Image, steps: int, rng: np.random.Generator) -> Image.Image:
    """The image diffused forward ``steps`` steps (VCD's contrast image), as 8-bit RGB."""
    x = np.asarray(image.convert("RGB"), dtype=np.float64) / 127.5 - 1.0
    abar = alpha_bar(steps)
    eps = rng.standard_normal(x.shape)
    xt = np.sqrt(abar) * x + np.sqrt(1.0 - abar) * eps
    pixels = np.clip(np.rint((xt + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def mismatch_map(image_ids: Sequence[str], seed: int) -> dict[str, str]:
    """Each distinct image id -> another one: a seeded random single cycle over the sorted ids.

    A single cycle has no fixed point, so no question ever gets its own image back, and the same
    seed and image set always give the same map (whatever the order of the questions).
    """
    distinct = sorted(set(image_ids))
    if len(distinct) < 2:
        raise ConditionError(
            "--image-condition mismatch needs questions about at least two different images; "
            "use a larger --limit or another condition"
        )
    order = [distinct[i] for i in np.random.default_rng(seed).permutation(len(distinct))]
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}


# ----- the condition of one run ----------------------------------------------------------------------
@dataclass
class Condition:
    """What a condition run does to each question's image, and its link to the image run.

    ``donors`` maps an image id to a question holding the image a ``mismatch`` run shows instead.
    """

    name: str
    noise_steps: int = DEFAULT_NOISE_STEPS
    seed: int = 0
    donors: dict[str, Any] = field(default_factory=dict)
    base_run_id: str | None = None

    @property
    def text_only(self) -> bool:
        return self.name == "none"

    def config(self) -> dict[str, Any]:
        """The run-config entry (hashed into the run id): only what changes this condition's numbers."""
        out: dict[str, Any] = {"name": self.name}
        if self.name == "noise":
            out.update(steps=self.noise_steps, seed=self.seed)
        elif self.name == "mismatch":
            out.update(seed=self.seed)
        return out

    def image(self, sample: Any, load: Any) -> Image.Image:
        """The image the model sees for ``sample`` (``load(sample)`` reads a question's own image)."""
        if self.name == "mismatch":
            return load(self.donors[sample.image_id])
        original = load(sample)
        if self.name == "blank":
            return blank_image(original)
        if self.name == "noise":
            return noise_image(original, self.noise_steps, sample_rng(self.seed, sample.sample_id))
        raise ConditionError(f"condition {self.name!r} has no image")


def make_condition(name: str, samples: Sequence[Any], *, noise_steps: int, seed: int) -> Condition | None:
    """The condition of a run over ``samples`` (the whole run, before sharding); None for ``image``."""
    if name not in CONDITIONS:
        raise ConditionError(f"unknown image condition {name!r}; choose one of {', '.join(CONDITIONS)}")
    if name == "image":
        return None
    alpha_bar(noise_steps)  # validates the step count before anything loads
    donors: dict[str, Any] = {}
    if name == "mismatch":
        first: dict[str, Any] = {}
        for sample in sorted(samples, key=lambda s: s.sample_id):
            first.setdefault(sample.image_id, sample)
        donors = {image: first[other] for image, other in mismatch_map(list(first), seed).items()}
    return Condition(name=name, noise_steps=noise_steps, seed=seed, donors=donors)


def check_text_only(model: str) -> None:
    """Refuse ``none`` for a family whose processor needs an image, reading only the model's config."""
    import transformers

    from vrp.ingest.models.loading import adapter_class, resolve_source

    source, _name = resolve_source(model)
    spec = adapter_class(transformers.AutoConfig.from_pretrained(source).model_type).spec
    if not spec.text_only:
        raise ConditionError(
            f"--image-condition none is not available for {spec.family}: {spec.text_only_reason} "
            "Use --image-condition blank (a grey image of the same size) instead."
        )


def model_name(model: str) -> str:
    """The lake's ``model`` name of a checkpoint, without loading it."""
    from vrp.ingest.models.loading import resolve_source

    return resolve_source(model)[1]


def image_runs(lake: Any, model: str, dataset: str, split: str, dataset_hash: str) -> list[dict[str, Any]]:
    """Image runs in the lake of this model over exactly these questions (any other setting)."""
    import json

    if not lake.has_table("runs"):
        return []
    found = []
    for row in lake.arrow("runs").to_pylist():
        if row.get("kind") or row.get("base_run_id") or row["model"] != model:
            continue
        config = json.loads(row.get("config") or "{}")
        if (
            row.get("dataset") == dataset
            and row.get("split") == split
            and config.get("dataset_hash") == dataset_hash
        ):
            found.append(row)
    return found


def missing_image_run(model: str, dataset: str, split: str) -> str:
    return (
        f"no image run of {model} on {dataset} (split {split}) with these questions is in the lake: "
        "run `vrp ingest run` with the same options and --image-condition image first"
    )


def base_residuals(
    lake: Any, base_run_id: str, layer: int, sample_ids: Sequence[str]
) -> dict[str, np.ndarray]:
    """The image run's stored residual after ``layer`` at the answer position, per sample id.

    Samples whose state the image run did not store (``--layers`` without that layer) are absent.
    """
    import pyarrow as pa

    from vrp.lake import to_matrix

    if not lake.has_table("hidden"):
        return {}
    wanted = set(sample_ids)
    table = lake.arrow(
        "hidden", filter={"run_id": base_run_id, "site": "resid", "layer": layer}, columns=["sample_id", "h"]
    )
    ids = table.column("sample_id").to_pylist()
    keep = [i for i, s in enumerate(ids) if s in wanted]
    if not keep:
        return {}
    matrix = to_matrix(table.column("h").take(pa.array(keep)))
    return {ids[i]: matrix[j] for j, i in enumerate(keep)}


def first_token_kls(adapter: Any, base_last: Sequence[np.ndarray | None], logits: Any) -> list[float | None]:
    """KL(image || condition) per row: the image run's first-token distribution against this run's.

    The image run's distribution is recomputed from its stored last-layer residual through the final
    norm and the unembedding: the logit lens of the last layer is the model's own next-token logits,
    so the KL needs no vocabulary-sized column in the lake. ``logits`` [B, V] are this run's
    first-token logits; a row without a stored residual gets None.
    """
    import torch

    from vrp.ingest.capture import logit_lens

    rows = [b for b, h in enumerate(base_last) if h is not None]
    out: list[float | None] = [None] * len(base_last)
    if not rows:
        return out
    h = torch.from_numpy(np.stack([base_last[b] for b in rows])).to(adapter.device)
    logp_image = torch.log_softmax(logit_lens(adapter, h[None])[0].double(), dim=-1).cpu().numpy()
    logp_cond = torch.log_softmax(logits[rows].double(), dim=-1).cpu().numpy()
    for j, b in enumerate(rows):
        out[b] = first_token_kl(logp_image[j], logp_cond[j])
    return out


def first_token_kl(logp_image: np.ndarray, logp_condition: np.ndarray) -> float:
    """KL(P_image || P_condition) in nats over the whole vocabulary (0 log 0 = 0)."""
    p = np.exp(logp_image.astype(np.float64))
    diff = logp_image.astype(np.float64) - logp_condition.astype(np.float64)
    return float(np.sum(np.where(p > 0, p * diff, 0.0)))
