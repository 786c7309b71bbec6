"""Causal interventions: patch masking, probe-neuron ablation, destruction sweep (docs/ARCHITECTURE.md 5).

What this module offers:

* :func:`grey_value` / :func:`mask_cells` - grey out (RGB 128) whole patch-grid cells directly in
  the *preprocessed* ``pixel_values``, in the processor's own normalisation, for both layouts the
  families use: an image tensor ``[B, C, H, W]`` (LLaVA, PaliGemma) and Qwen2-VL's flattened
  ``[patches, C * T * P * P]`` rows ordered by merged cell. Masking after the resize is exact: a
  grey box drawn on the original image would bleed into neighbouring patches through interpolation.
* :func:`rank_cells` - the top / bottom / a seeded random share of a stored attention map's cells.
* :class:`EditOutput` - a forward hook that overwrites chosen output coordinates of a module (an
  MLP) at every position, as a context manager that always removes itself.
* :func:`answer_batch` - greedy answer plus first-token statistics for one (edited) forward.
* :func:`plan_mask`, :func:`plan_ablate`, :func:`plan_destroy` - read and check every prerequisite
  from the lake (base run, stored maps, probe neurons, layer range) *before* any model is loaded.
* :func:`run_intervention` - execute a plan as a run of its own: its ``run_id`` hashes the base
  run, the kind and the setting; rows go to ``interventions`` keyed (run, sample, condition, level).

Usage::

    plan = plan_mask(lake, base_run_id, ratio=0.3, layer=-1, seed=1)
    summary = run_intervention(plan, lake_root)

An intervention run's ``runs`` row has ``kind`` and ``base_run_id`` set; its answers live in
``interventions`` only, and a sample is complete once its ``interventions`` rows (all conditions
of one sample, committed together) are in the lake: ``samples`` keeps capture runs only.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import vrp
from vrp.ingest.capture import first_token_truth
from vrp.ingest.generate import sample_seed
from vrp.ingest.prompts import apply_template
from vrp.lake.identity import make_run_id
from vrp.tasks import Gold, Task, get_task, task_of_run
from vrp.tasks.base import Label, as_gold

KINDS = ("mask", "ablate", "destroy")
MASK_CONDITIONS = ("full", "high", "low", "random")
GREY = 128
NEURON_SITE = "mlp_out"


class InterventionError(RuntimeError):
    """An intervention that cannot run; the message says what is missing and what to do."""


# ----- patch masking -----------------------------------------------------------------------------------


def n_cells(ratio: float, total: int) -> int:
    """How many of ``total`` cells a ratio masks: ``ratio * total`` rounded half up (0.3 of 576 -> 173)."""
    return int(math.floor(ratio * total + 0.5))


def rank_cells(
    attention: np.ndarray, condition: str, count: int, rng: np.random.Generator | None = None
) -> list[int]:
    """Cells (row-major ids) to mask for one condition.

    ``high``: the ``count`` most attended cells; ``low``: the ``count`` least attended; ties go to
    the lower cell id (a stable sort), so the choice never depends on float noise in the order of
    equal values. ``random``: ``count`` distinct cells drawn with ``rng``. ``full``: none.
    """
    values = np.asarray(attention, dtype=np.float64).ravel()
    if not 0 <= count <= values.size:
        raise ValueError(f"cannot choose {count} of {values.size} cells")
    if condition == "full" or count == 0:
        return []
    if condition == "high":
        order = np.argsort(-values, kind="stable")
    elif condition == "low":
        order = np.argsort(values, kind="stable")
    elif condition == "random":
        if rng is None:
            raise ValueError("the random condition needs a seeded generator")
        order = rng.permutation(values.size)
    else:
        raise ValueError(
            f"unknown mask condition {condition!r}; expected one of {', '.join(MASK_CONDITIONS)}"
        )
    return sorted(int(c) for c in order[:count])


def grey_value(processor: Any) -> torch.Tensor:
    """Per-channel value of an RGB 128 pixel after the image processor's rescale and normalisation."""
    ip = processor.image_processor
    value = torch.full((3,), float(GREY), dtype=torch.float64)
    if getattr(ip, "do_rescale", True):
        value = value * float(getattr(ip, "rescale_factor", 1 / 255))
    if getattr(ip, "do_normalize", True):
        mean = torch.as_tensor(list(ip.image_mean), dtype=torch.float64)
        std = torch.as_tensor(list(ip.image_std), dtype=torch.float64)
        value = (value - mean) / std
    return value.float()


def _flat_patch_layout(adapter: Any) -> tuple[int, int, int]:
    """(patch, merge, temporal) of a processor with flattened patches (Qwen2-VL's ``image_grid_thw``)."""
    ip = adapter.processor.image_processor
    return int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)


def mask_cells(
    adapter: Any, enc: Any, cells: Sequence[Sequence[int]], value: torch.Tensor | None = None
) -> torch.Tensor:
    """A copy of ``enc.inputs["pixel_values"]`` with every pixel of the given cells set to grey.

    ``cells[row]`` lists the grid cells (row-major, as in the lake's attention maps) of batch row
    ``row``. Image layout ``[B, C, H, W]``: the cell's :meth:`Adapter.patch_box` is filled. Flattened
    layout (``image_grid_thw`` present): image ``row`` owns ``t*h*w`` consecutive patch rows, ordered
    by merged cell, then the ``merge x merge`` patches inside it; each row holds ``C`` channel blocks
    of ``T * P * P`` values. A merged cell is therefore ``merge**2`` consecutive rows, all set.
    """
    pixels = enc.inputs["pixel_values"].clone()
    grey = (grey_value(adapter.processor) if value is None else value).to(pixels.device, pixels.dtype)
    if len(cells) != len(enc.grids):
        raise ValueError(f"{len(cells)} cell lists for a batch of {len(enc.grids)}")
    if "image_grid_thw" in enc.inputs:
        patch, merge, temporal = _flat_patch_layout(adapter)
        channels = grey.numel()
        block = temporal * patch * patch
        if pixels.shape[1] != channels * block:
            raise ValueError(
                f"pixel_values rows have {pixels.shape[1]} values, "
                f"expected {channels}x{temporal}x{patch}x{patch}"
            )
        row_values = grey.repeat_interleave(block)  # [C * T * P * P]
        thw = enc.inputs["image_grid_thw"].tolist()
        offsets = np.cumsum([0] + [t * h * w for t, h, w in thw])
        for row, chosen in enumerate(cells):
            grid_h, grid_w = enc.grids[row]
            for cell in chosen:
                if not 0 <= cell < grid_h * grid_w:
                    raise IndexError(f"cell {cell} outside the {grid_h}x{grid_w} grid")
                start = int(offsets[row]) + cell * merge * merge
                pixels[start : start + merge * merge] = row_values
        return pixels
    if pixels.dim() != 4:
        raise ValueError(f"unsupported pixel_values layout {tuple(pixels.shape)}")
    for row, chosen in enumerate(cells):
        for cell in chosen:
            x0, y0, x1, y1 = adapter.patch_box(enc, row, cell)
            pixels[row, :, y0:y1, x0:x1] = grey[:, None, None]
    return pixels


# ----- coordinate edits --------------------------------------------------------------------------------


class EditOutput:
    """Overwrite chosen coordinates of a module's output at every position while the block runs.

    Usage::

        with EditOutput(adapter.mlp(3), [17, 40]):               # zero coordinates 17 and 40
            logits = adapter.model(**enc.inputs).logits
        with EditOutput(adapter.mlp(3), [17, 40], values=means):  # mean-replace them instead

    The hook replaces the output (a fresh tensor, the module's own output is not modified) on every
    forward, so prefill and every decoding step are edited alike; it is removed on exit, also on error.
    """

    def __init__(
        self, module: torch.nn.Module, coords: Sequence[int], values: Sequence[float] | None = None
    ) -> None:
        self.module = module
        self.coords = torch.as_tensor(list(coords), dtype=torch.long)
        self.values = None if values is None else torch.as_tensor(list(values), dtype=torch.float32)
        if self.values is not None and self.values.shape != self.coords.shape:
            raise ValueError(f"{self.values.numel()} values for {self.coords.numel()} coordinates")
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> EditOutput:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if self.coords.numel() == 0:
            return output
        coords = self.coords.to(hidden.device)
        edited = hidden.clone()
        if self.values is None:
            edited[..., coords] = 0
        else:
            edited[..., coords] = self.values.to(hidden.device, hidden.dtype)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited


# ----- answering ---------------------------------------------------------------------------------------


def answer_batch(
    adapter: Any,
    inputs: dict[str, torch.Tensor],
    golds: Sequence[Gold | str],
    *,
    task: Task | None = None,
    images: Sequence[Any] | None = None,
    questions: Sequence[str] | None = None,
    max_new_tokens: int = 8,
) -> list[dict[str, Any]]:
    """Greedy answer and first-token statistics per row (the base run's decoding, without any capture).

    Parsing, scoring and the task's own statistics come from `task` (yes/no by default); the
    truth token's probability and margin are those of the intervened model's logits.
    """
    task = task if task is not None else get_task("yesno")
    golds = [as_gold(g) for g in golds]
    prompt_len = int(inputs["input_ids"].shape[1])
    with torch.no_grad():
        out = adapter.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=adapter.tokenizer.pad_token_id,
        )
    logits = out.logits[0].float().cpu()
    stats = task.token_stats(adapter, logits)
    truth_ids = task.truth_ids(adapter, images or [], questions or [], golds, logits)
    truth = first_token_truth(logits, truth_ids.clamp(min=0))
    texts = adapter.tokenizer.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True)
    rows = []
    for b, gold in enumerate(golds):
        answer, status = task.parse(texts[b])
        correct, score = task.score(answer, gold)
        known = bool(truth_ids[b] >= 0)
        rows.append(
            {
                "answer_text": texts[b],
                "answer": answer,
                "parse_status": status,
                "correct": correct,
                "score": score,
                **{key: float(values[b]) for key, values in stats.items()},
                "truth_prob": float(truth["truth_prob"][b]) if known else None,
                "truth_margin": float(truth["truth_margin"][b]) if known else None,
            }
        )
    return rows


# ----- plans: everything read from the lake, checked before a model is loaded ---------------------------


@dataclass(frozen=True)
class Edit:
    """One coordinate-edit condition of an ablate/destroy run: which coordinates, replaced by what."""

    condition: str
    level: float
    coords: tuple[int, ...]
    values: tuple[float, ...] | None = None  # None = zero
    seed: int | None = None


@dataclass
class InterventionPlan:
    """A checked intervention: the base run, the setting, and what each condition does."""

    kind: str
    base: dict[str, Any]  # the base run's `runs` row, config parsed
    layer: int
    setting: str
    seed: int
    params: dict[str, Any]  # hashed with the base run, kind and setting
    conditions: tuple[str, ...] = ()  # mask conditions
    ratio: float = 0.0
    maps: dict[str, tuple[int, int, np.ndarray]] = field(default_factory=dict)  # mask: sample -> map
    edits: tuple[Edit, ...] = ()  # ablate / destroy

    @property
    def base_run_id(self) -> str:
        return str(self.base["run_id"])

    @property
    def config(self) -> dict[str, Any]:
        from vrp.schema import SCHEMA_VERSION

        return {
            "base_run_id": self.base_run_id,
            "kind": self.kind,
            "setting": self.setting,
            **self.params,
            "max_new_tokens": self.max_new_tokens,
            "schema_version": SCHEMA_VERSION,
        }

    @property
    def run_id(self) -> str:
        return make_run_id(self.config)

    @property
    def max_new_tokens(self) -> int:
        return int(self.base["config"].get("decoding", {}).get("max_new_tokens", 8))


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def base_run(lake: Any, run_id: str) -> dict[str, Any]:
    """The base run's `runs` row with its config parsed; clear errors for a missing or wrong run."""
    rows = lake.arrow("runs", filter={"run_id": run_id}).to_pylist() if lake.has_table("runs") else []
    if not rows:
        raise InterventionError(
            f"no run {run_id!r} in the lake at {lake.root}; ingest one with `vrp ingest run` "
            "or list runs with "
            '`vrp query "select run_id, model, dataset, status from runs"`'
        )
    row = dict(rows[0])
    if row.get("kind"):
        raise InterventionError(
            f"run {run_id} is itself a {row['kind']} intervention; pass the baseline run it was made from "
            f"({row.get('base_run_id')})"
        )
    row["config"] = json.loads(row.get("config") or "{}")
    n_done = lake.sql(f"select count(*) from samples where run_id = {_sql_str(run_id)}").fetchall()[0][0]
    if not n_done:
        raise InterventionError(
            f"run {run_id} has no completed samples; finish it with `vrp ingest run` first"
        )
    return row


def num_layers_of(lake: Any, run_id: str) -> int:
    """Decoder layers of the base run's model: the `layers` table holds every layer of every sample."""
    n = lake.sql(f"select max(layer) + 1 from layers where run_id = {_sql_str(run_id)}").fetchall()[0][0]
    if n is None:
        raise InterventionError(f"run {run_id} has no `layers` rows; it is not a complete `vrp ingest run`")
    return int(n)


def resolve_layer(layer: int, num_layers: int) -> int:
    """A decoder layer index; negative counts from the end (-1 is the last)."""
    index = layer + num_layers if layer < 0 else layer
    if not 0 <= index < num_layers:
        raise InterventionError(
            f"layer {layer} is out of range: the base run's model has {num_layers} decoder layers"
        )
    return index


def peak_layer(lake: Any, run_id: str) -> int:
    """The layer whose single-layer logistic probe scored the highest held-out AUROC (`probe_layers`).

    The residual-stream probes are preferred (the study's probe), the MLP-output ones used when only
    those exist; ties go to the earlier layer.
    """
    rows = (
        lake.sql(
            "select site, layer, auroc from probe_layers where run_id = "
            f"{_sql_str(run_id)} and probe = 'logreg' and auroc is not null"
        ).fetchall()
        if lake.has_table("probe_layers")
        else []
    )
    if not rows:
        raise InterventionError(
            f"run {run_id} has no probe results (probe_layers); run `vrp analyze probes` first, "
            "or pass a layer number"
        )
    for site in ("resid", NEURON_SITE):
        mine = [(layer, auroc) for s, layer, auroc in rows if s == site]
        if mine:
            return int(min(mine, key=lambda item: (-item[1], item[0]))[0])
    layer, _ = min(((layer, auroc) for _s, layer, auroc in rows), key=lambda item: (-item[1], item[0]))
    return int(layer)


def probe_order(lake: Any, run_id: str, layer: int, method: str) -> list[int]:
    """Coordinates of layer ``layer``'s MLP output in the probe's rank order (`probe_neurons`)."""
    rows = (
        lake.sql(
            "select neuron, rank, coef from probe_neurons where run_id = "
            f"{_sql_str(run_id)} and site = '{NEURON_SITE}' and layer = {int(layer)} "
            f"and method = {_sql_str(method)}"
        ).fetchall()
        if lake.has_table("probe_neurons")
        else []
    )
    if not rows:
        raise InterventionError(
            f"run {run_id} has no {method} probe neurons for layer {layer} "
            f"(probe_neurons, site {NEURON_SITE}); "
            "run `vrp analyze probes` first"
        )
    rows.sort(key=lambda r: (r[1] if r[1] is not None else math.inf, -abs(r[2] or 0.0), r[0]))
    return [int(r[0]) for r in rows]


def _hidden_size(base: dict[str, Any]) -> int:
    size = base["config"].get("hidden_size")
    if not size:
        raise InterventionError(f"run {base['run_id']} does not record hidden_size in its config")
    return int(size)


def plan_mask(
    lake: Any,
    base_run_id: str,
    *,
    ratio: float = 0.3,
    conditions: Sequence[str] = MASK_CONDITIONS,
    layer: int = -1,
    seed: int = 0,
) -> InterventionPlan:
    """Check and read what patch masking needs: the base run and its stored maps of ``layer``."""
    if not 0 < ratio < 1:
        raise InterventionError(f"--ratio must lie strictly between 0 and 1, got {ratio}")
    unknown = [c for c in conditions if c not in MASK_CONDITIONS]
    if unknown or not conditions:
        raise InterventionError(
            f"unknown mask conditions {unknown or '(none)'}; choose from {', '.join(MASK_CONDITIONS)}"
        )
    base = base_run(lake, base_run_id)
    index = resolve_layer(layer, num_layers_of(lake, base_run_id))
    table = lake.arrow(
        "attention_maps",
        filter={"run_id": base_run_id, "layer": index},
        columns=["sample_id", "grid_h", "grid_w", "map"],
    )
    if table.num_rows == 0:
        stored = base["config"].get("capture", {}).get("layers")
        raise InterventionError(
            f"run {base_run_id} did not store the attention maps of layer {index} "
            f"(it stored layers {stored}); "
            "choose one of those with --layer, or re-ingest with --layers including it"
        )
    maps = {
        row["sample_id"]: (int(row["grid_h"]), int(row["grid_w"]), np.asarray(row["map"], dtype=np.float64))
        for row in table.to_pylist()
    }
    ordered = tuple(c for c in MASK_CONDITIONS if c in conditions)
    return InterventionPlan(
        kind="mask",
        base=base,
        layer=index,
        setting=f"ratio={ratio:g},layer={index},seed={seed}",
        seed=seed,
        params={"conditions": list(ordered), "ratio": ratio},
        conditions=ordered,
        ratio=ratio,
        maps=maps,
    )


def _mean_mlp_out(lake: Any, run_id: str, layer: int, coords: Sequence[int]) -> tuple[float, ...]:
    """Mean of each coordinate over the base run's stored MLP outputs at the answer position."""
    from vrp.lake import to_matrix

    table = lake.arrow(
        "hidden", filter={"run_id": run_id, "site": NEURON_SITE, "layer": layer}, columns=["h"]
    )
    if table.num_rows == 0:
        raise InterventionError(
            f"run {run_id} did not store layer {layer}'s MLP output (hidden, site {NEURON_SITE}), which "
            "--mode mean averages; use --mode zero or re-ingest with --layers including it"
        )
    matrix = to_matrix(table.column("h")).astype(np.float64)
    return tuple(float(v) for v in matrix[:, list(coords)].mean(axis=0))


def plan_ablate(
    lake: Any,
    base_run_id: str,
    *,
    layer: int,
    top_k: int = 5,
    mode: str = "zero",
    control: str | None = "random",
    seed: int = 0,
) -> InterventionPlan:
    """Check and read what neuron ablation needs: the L1 probe's top-k neurons of ``layer``.

    Conditions: ``full`` (no edit, the paired reference), ``probe`` (the top-k), and with
    ``control="random"`` ``random`` (k coordinates drawn with ``seed`` among those not in the top-k).
    """
    if mode not in ("zero", "mean"):
        raise InterventionError(f"--mode must be zero or mean, got {mode!r}")
    if control not in (None, "none", "random"):
        raise InterventionError(f"--control must be random or none, got {control!r}")
    if top_k < 1:
        raise InterventionError(f"--top-k must be at least 1, got {top_k}")
    base = base_run(lake, base_run_id)
    index = resolve_layer(layer, num_layers_of(lake, base_run_id))
    hidden = _hidden_size(base)
    order = probe_order(lake, base_run_id, index, "l1")
    if len(order) < top_k:
        raise InterventionError(
            f"the L1 probe of layer {index} ranked only {len(order)} neurons, fewer than --top-k {top_k}"
        )
    top = tuple(sorted(order[:top_k]))
    rest = np.setdiff1d(np.arange(hidden), np.asarray(top))
    edits = [Edit("full", 0.0, ())]
    chosen = [("probe", top, None)]
    if control == "random":
        rng = np.random.default_rng(seed)
        chosen.append(
            ("random", tuple(sorted(int(c) for c in rng.choice(rest, size=top_k, replace=False))), seed)
        )
    for condition, coords, used_seed in chosen:
        values = _mean_mlp_out(lake, base_run_id, index, coords) if mode == "mean" else None
        edits.append(Edit(condition, float(top_k), coords, values, used_seed))
    return InterventionPlan(
        kind="ablate",
        base=base,
        layer=index,
        setting=f"layer={index},k={top_k},mode={mode},seed={seed}",
        seed=seed,
        params={"edits": [[e.condition, list(e.coords), e.values] for e in edits]},
        edits=tuple(edits),
    )


def plan_destroy(
    lake: Any,
    base_run_id: str,
    *,
    layer: int | str,
    fractions: Sequence[float] = (0.05, 0.1, 0.25, 0.5, 0.75),
    order: str = "probe",
    seed: int = 0,
) -> InterventionPlan:
    """Check and read what the destruction sweep needs; ``layer="peak"`` takes the best probe layer.

    Each fraction f zeroes the first ``round(f * hidden)`` coordinates of one order: the L2 probe's
    |coefficient| ranking over all coordinates (``probe``) or a permutation drawn with ``seed``
    (``random``); so a larger fraction always contains a smaller one. ``full`` is the reference.
    """
    if order not in ("probe", "random"):
        raise InterventionError(f"--order must be probe or random, got {order!r}")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad or not fractions:
        raise InterventionError(f"--fractions must lie in (0, 1], got {list(fractions) or '(none)'}")
    base = base_run(lake, base_run_id)
    n_layers = num_layers_of(lake, base_run_id)
    index = peak_layer(lake, base_run_id) if layer == "peak" else resolve_layer(int(layer), n_layers)
    hidden = _hidden_size(base)
    if order == "probe":
        ranking = probe_order(lake, base_run_id, index, "l2")
        if len(ranking) < hidden:
            missing = np.setdiff1d(np.arange(hidden), np.asarray(ranking))
            ranking = ranking + [int(c) for c in missing]  # unranked coordinates come last, in index order
    else:
        ranking = [int(c) for c in np.random.default_rng(seed).permutation(hidden)]
    edits = [Edit("full", 0.0, ())]
    for fraction in sorted(set(fractions)):
        count = n_cells(fraction, hidden)
        edits.append(
            Edit(
                order,
                float(fraction),
                tuple(sorted(ranking[:count])),
                None,
                seed if order == "random" else None,
            )
        )
    return InterventionPlan(
        kind="destroy",
        base=base,
        layer=index,
        setting=f"layer={index},order={order},seed={seed}",
        seed=seed,
        params={"fractions": sorted(set(fractions)), "order": ranking},
        edits=tuple(edits),
    )


# ----- running -----------------------------------------------------------------------------------------


@dataclass
class InterventionSummary:
    """What an intervention run did, for the terminal and for tests."""

    run_id: str
    base_run_id: str
    kind: str
    setting: str
    total: int
    skipped_done: int
    written: int = 0
    # (condition, level) -> (correct, n, sum of the task's margins) over the samples answered now
    tally: dict[tuple[str, float], tuple[int, int, float]] = field(default_factory=dict)
    seconds: float = 0.0
    margin_label: str = "yes/no margin"

    def lines(self) -> list[str]:
        out = [
            f"{self.kind} run {self.run_id} (base {self.base_run_id}, {self.setting}): "
            f"{self.written} new samples, "
            f"{self.skipped_done} already in the lake, {self.seconds:.1f}s"
        ]
        for (condition, level), (correct, n, margin) in sorted(self.tally.items()):
            out.append(
                f"  {condition:<7} level {level:g}: accuracy {correct / n:.3f}, "
                f"mean {self.margin_label} {margin / n:+.3f} (n={n})"
            )
        return out


def find_base_samples(
    plan: InterventionPlan,
    lake: Any,
    *,
    data_dir: str | None = None,
    pope_file: str | None = None,
    image_dir: str | None = None,
) -> list[Any]:
    """The base run's completed samples, re-found in its dataset (paths from its config unless overridden).

    The sample id hashes the image bytes, so a sample found here is the very question and image the
    base run answered; one that cannot be found is an error (the files moved or changed).
    """
    from vrp.ingest.datasets import load_dataset

    base = plan.base
    source = base["config"].get("data_source", {})
    dataset = base["config"].get("dataset") or base.get("dataset")
    split = base["config"].get("split")
    kwargs = {
        "data_dir": data_dir or source.get("data_dir"),
        "pope_file": pope_file or source.get("pope_file"),
        "image_dir": image_dir or source.get("image_dir"),
        "questions_file": source.get("questions_file"),
        "annotations_file": source.get("annotations_file"),
        "data_file": source.get("data_file"),
    }
    if dataset in ("shapes-pope", "shapes-vqa"):
        kwargs = {"data_dir": kwargs["data_dir"]}
    else:
        kwargs.pop("data_dir")
    rows = lake.sql(
        f"select sample_id, label, question_id from samples where run_id = {_sql_str(plan.base_run_id)}"
    ).fetchall()
    try:  # only the base run's questions: a VQAv2 file holds far more than a run answers
        samples, _errors = load_dataset(
            dataset,
            split=None if split in (None, "all") or dataset not in ("pope", "shapes-pope") else split,
            question_ids={row[2] for row in rows},
            **kwargs,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise InterventionError(f"cannot re-read the base run's dataset {dataset!r}: {exc}") from exc
    labels = {row[0]: row[1] for row in rows}
    found = [s for s in samples if s.sample_id in labels]
    missing = set(labels) - {s.sample_id for s in found}
    if missing:
        raise InterventionError(
            f"{len(missing)} of the base run's {len(labels)} samples are not in the dataset as read now "
            "(files moved or changed); pass the base run's data with --data-dir or --pope-file/--image-dir"
        )
    return found


def _run_row(plan: InterventionPlan, device: str) -> dict[str, Any]:
    base = plan.base
    return {
        "run_id": plan.run_id,
        "model": base["model"],
        "model_source": base.get("model_source"),
        "model_revision": base.get("model_revision"),
        "family": base.get("family"),
        "dataset": base.get("dataset"),
        "split": base.get("split"),
        "dtype": base.get("dtype"),
        "device": device,
        "attention_backend": "sdpa",
        "code_version": vrp.__version__,
        "config": plan.config,
        "base_run_id": plan.base_run_id,
        "kind": plan.kind,
    }


def load_base_adapter(plan: InterventionPlan, *, model: str | None = None, device: str = "cpu") -> Any:
    """The base run's model with its dtype and processor settings; refuses a checkpoint that changed."""
    from vrp.ingest.models import load_adapter
    from vrp.lake.identity import canonical_json

    base = plan.base
    settings = base["config"].get("adapter", {})
    adapter = load_adapter(
        model or base["model_source"],
        dtype=base.get("dtype") or "float32",
        device=device,
        min_pixels=settings.get("min_pixels"),
        max_pixels=settings.get("max_pixels"),
    )
    if adapter.revision != base.get("model_revision"):
        raise InterventionError(
            f"{adapter.source} is at revision {adapter.revision}, "
            f"the base run used {base.get('model_revision')}; "
            "intervene with the checkpoint the base run answered with"
        )
    if settings and canonical_json(adapter.settings) != canonical_json(settings):
        raise InterventionError(
            "the model's processor/prompt settings differ from the base run's; load it as the base run did"
        )
    return adapter


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _condition_rows(
    plan: InterventionPlan, adapter: Any, batch: Sequence[Any], labels: dict[str, str]
) -> list[dict[str, Any]]:
    """Every condition's interventions rows for one batch of samples."""
    from vrp.ingest.datasets import load_image

    template = plan.base["config"].get("question_template", "{question}")
    images = [load_image(s) for s in batch]
    questions = [apply_template(template, s.question) for s in batch]
    enc = adapter.encode(images, questions)
    task = task_of_run(plan.base["config"])
    golds = [Label(labels[s.sample_id], s.answers) for s in batch]
    asked = {"task": task, "images": images, "questions": questions, "max_new_tokens": plan.max_new_tokens}
    common = {"kind": plan.kind, "setting": plan.setting}
    rows: list[dict[str, Any]] = []
    if plan.kind == "mask":
        grey = grey_value(adapter.processor)
        for condition in plan.conditions:
            chosen = []
            for b, sample in enumerate(batch):
                grid_h, grid_w, attention = plan.maps[sample.sample_id]
                if (grid_h, grid_w) != tuple(enc.grids[b]):
                    raise InterventionError(
                        f"sample {sample.sample_id}: the stored map is {grid_h}x{grid_w} but the "
                        f"processor now gives {enc.grids[b][0]}x{enc.grids[b][1]}; its settings changed"
                    )
                count = 0 if condition == "full" else n_cells(plan.ratio, grid_h * grid_w)
                rng = np.random.default_rng(sample_seed(plan.seed, sample.sample_id, 0))
                chosen.append(rank_cells(attention, condition, count, rng))
            inputs = dict(enc.inputs)
            if any(chosen):
                inputs["pixel_values"] = mask_cells(adapter, enc, chosen, grey)
            answers = answer_batch(adapter, inputs, golds, **asked)
            level = 0.0 if condition == "full" else plan.ratio
            for sample, cells, answer in zip(batch, chosen, answers, strict=True):
                rows.append(
                    {
                        "sample_id": sample.sample_id,
                        **common,
                        "condition": condition,
                        "level": level,
                        "detail": json.dumps({"patches": cells}),
                        "seed": plan.seed if condition == "random" else None,
                        **answer,
                    }
                )
        return rows
    module = adapter.mlp(plan.layer)
    for edit in plan.edits:
        with EditOutput(module, edit.coords, edit.values):
            answers = answer_batch(adapter, enc.inputs, golds, **asked)
        detail = (
            {"neurons": list(edit.coords), "values": list(edit.values) if edit.values else None}
            if plan.kind == "ablate"
            else {"n": len(edit.coords), "coords": "the first n of runs.config.order"}
        )
        for sample, answer in zip(batch, answers, strict=True):
            rows.append(
                {
                    "sample_id": sample.sample_id,
                    **common,
                    "condition": edit.condition,
                    "level": edit.level,
                    "detail": json.dumps(detail),
                    "seed": edit.seed,
                    **answer,
                }
            )
    return rows


def run_intervention(
    plan: InterventionPlan,
    lake_root: str,
    *,
    model: str | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    commit_samples: int = 256,
    data_dir: str | None = None,
    pope_file: str | None = None,
    image_dir: str | None = None,
    adapter: Any = None,
    echo: Callable[[str], None] = print,
    progress: bool | None = None,
) -> InterventionSummary:
    """Execute a checked plan as a run of its own; resumable, and a rerun writes nothing.

    ``adapter`` (an already loaded base model) skips loading; otherwise the base run's checkpoint
    (or ``model``) is loaded with the base run's dtype and processor settings.
    """
    from vrp.lake import open_lake

    started = time.monotonic()
    lake = open_lake(lake_root)
    samples = find_base_samples(plan, lake, data_dir=data_dir, pope_file=pope_file, image_dir=image_dir)
    labels = dict(
        lake.sql(
            f"select sample_id, label from samples where run_id = {_sql_str(plan.base_run_id)}"
        ).fetchall()
    )
    if plan.kind == "mask":
        missing = [s.sample_id for s in samples if s.sample_id not in plan.maps]
        if missing:
            raise InterventionError(
                f"{len(missing)} samples of run {plan.base_run_id} have no layer {plan.layer} map"
            )
    run_id = plan.run_id
    done = {
        row[0]
        for row in lake.sql(
            f"select distinct sample_id from interventions where run_id = {_sql_str(run_id)}"
        ).fetchall()
    }
    status = lake.arrow("runs", filter={"run_id": run_id}, columns=["status"]).to_pylist()
    summary = InterventionSummary(
        run_id=run_id,
        base_run_id=plan.base_run_id,
        kind=plan.kind,
        setting=plan.setting,
        total=len(samples),
        skipped_done=sum(s.sample_id in done for s in samples),
        margin_label=task_of_run(plan.base["config"]).margin_label,
    )
    margin_column = task_of_run(plan.base["config"]).margin_column
    if summary.skipped_done == len(samples) and status and status[0]["status"] == "complete":
        summary.seconds = time.monotonic() - started
        return summary  # nothing to do: not even the runs row is touched
    if adapter is None:
        adapter = load_base_adapter(plan, model=model, device=device)
    elif adapter.name != plan.base["model"]:
        raise InterventionError(f"adapter {adapter.name} is not the base run's model {plan.base['model']}")
    writer = lake.writer(_run_row(plan, device), owned_sample_ids=[s.sample_id for s in samples])
    done = writer.begin()
    todo = [s for s in samples if s.sample_id not in done]
    echo(f"{plan.kind} run {run_id}: {len(todo)} of {len(samples)} samples to answer ({plan.setting})")
    show = sys.stderr.isatty() if progress is None else progress
    pending: list[dict[str, Any]] = []
    pending_ids: list[str] = []
    with tqdm(total=len(todo), desc=f"{plan.kind} {adapter.name}", unit="q", disable=not show) as bar:
        for batch in _batches(todo, batch_size):
            rows = _condition_rows(plan, adapter, batch, labels)
            pending.extend(rows)
            pending_ids.extend(s.sample_id for s in batch)
            for row in rows:
                key = (row["condition"], row["level"])
                correct, n, margin = summary.tally.get(key, (0, 0, 0.0))
                summary.tally[key] = (
                    correct + bool(row["correct"]),
                    n + 1,
                    margin + (row[margin_column] or 0.0),
                )
            bar.update(len(batch))
            if len(pending_ids) >= commit_samples:
                writer.commit({"interventions": pending})
                summary.written += len(pending_ids)
                pending, pending_ids = [], []
    if pending_ids:
        writer.commit({"interventions": pending})
        summary.written += len(pending_ids)
    writer.finish("complete")
    summary.seconds = time.monotonic() - started
    return summary
