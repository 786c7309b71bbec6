"""Small synthetic lakes with known answers, for the analysis tests and for trying `vrp report`.

``write_synthetic_lake(root)`` writes, through the real lake writer, one base run per model
(samples, layers, hidden states at sites ``resid`` and ``mlp_out``) and optionally a masking
intervention run, and returns the ground truth as numpy arrays so a test can compute every
expected number independently of SQL. The signal is planted: correctness is carried by one
layer's hidden states and by a few behavioural metrics; attention metrics carry none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vrp.lake import open_lake
from vrp.lake.identity import make_run_id, make_sample_id


@dataclass
class ModelTruth:
    """What was written for one model's base run (arrays aligned with ``sample_ids``)."""

    run_id: str
    sample_ids: list[str]
    split: np.ndarray
    image_id: np.ndarray
    label: np.ndarray
    answer: np.ndarray  # "yes" / "no" / None
    correct: np.ndarray  # object: True / False / None
    metrics: dict[str, np.ndarray]
    truth_margin: np.ndarray  # samples x layers
    answer_rank: np.ndarray
    layer_entropy: np.ndarray
    hidden: dict[str, np.ndarray] = field(default_factory=dict)  # site -> layers x samples x d
    interventions: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> correct (bool)
    intervention_run_id: str | None = None


def write_synthetic_lake(
    root: str | Path,
    *,
    models: tuple[str, ...] = ("toy-llava", "toy-qwen"),
    n: int = 120,
    layers: int = 4,
    hidden_size: int = 16,
    signal_layer: int = 2,
    splits: tuple[str, ...] = ("random", "adversarial"),
    interventions: bool = True,
    constant_cluster_count: tuple[str, ...] = (),
    unknown_share: float = 0.05,
    destroy: bool = False,
    seed: int = 0,
) -> dict[str, ModelTruth]:
    """Write one base run per model (n samples split across ``splits``, 6 questions per image).

    Models named in ``constant_cluster_count`` get C_k = 0 on every sample (as on a tiny grid).
    """
    lake = open_lake(root)
    truth: dict[str, ModelTruth] = {}
    for m_index, model in enumerate(models):
        rng = np.random.default_rng(seed + 101 * m_index)
        run = {
            "model": model,
            "model_source": f"synthetic/{model}",
            "model_revision": "synthetic",
            "family": "synthetic",
            "dataset": "shapes-pope",
            "split": ",".join(splits),
            "dtype": "float32",
            "device": "cpu",
            "attention_backend": "sdpa",
            "code_version": "synthetic",
            "config": {"hidden_size": hidden_size, "num_layers": layers, "seed": seed, "model": model},
        }
        run["run_id"] = make_run_id(run["config"] | {"model": model})
        t = _model_truth(rng, run["run_id"], n, layers, hidden_size, signal_layer, splits, unknown_share)
        if model in constant_cluster_count:
            t.metrics["cluster_count"][:] = 0
        writer = lake.writer(run)
        writer.begin()
        writer.commit(_rows(t, layers))
        writer.finish()
        if interventions:
            _write_intervention(lake, run, t, rng)
        if destroy:
            _write_intervention(lake, run, t, rng, kind="destroy")
        truth[model] = t
    return truth


def _model_truth(
    rng: np.random.Generator,
    run_id: str,
    n: int,
    layers: int,
    d: int,
    signal_layer: int,
    splits: tuple[str, ...],
    unknown_share: float = 0.05,
) -> ModelTruth:
    split = np.array([splits[i % len(splits)] for i in range(n)])
    image_id = np.array([f"img{i // 6:04d}" for i in range(n)])
    label = np.where(rng.random(n) < 0.5, "yes", "no")
    is_right = rng.random(n) < 0.7
    unknown = rng.random(n) < unknown_share
    answer = np.where(is_right, label, np.where(label == "yes", "no", "yes")).astype(object)
    answer[unknown] = None
    correct = np.where(unknown, None, is_right).astype(object)
    y = is_right & ~unknown
    z = rng.normal(size=n)
    metrics = {
        "p_yes": rng.random(n),
        "yes_no_margin": np.where(answer == "yes", 1.0, -1.0) * (1.0 + 2.0 * y + np.abs(rng.normal(size=n))),
        "top1_prob": np.clip(0.6 + 0.2 * y + 0.1 * rng.normal(size=n), 0.01, 0.99),
        "top2_margin": 1.0 + 1.5 * y + rng.normal(size=n),
        "token_entropy": 1.0 - 0.5 * y + 0.3 * np.abs(rng.normal(size=n)),
        "answer_logprob": -0.5 + 0.3 * y + 0.2 * z,
        "sc_agreement": np.round(np.clip(0.6 + 0.3 * y + 0.1 * rng.normal(size=n), 0.1, 1.0), 1),
        "spatial_entropy": 2.0 + 0.3 * rng.normal(size=n),
        "cluster_count": rng.integers(0, 3, size=n).astype(np.int64),
    }
    # lens margins: flat, then the correct answers pull ahead from the middle layer on
    grow = np.clip(np.arange(layers) - layers // 2 + 1, 0, None)
    truth_margin = rng.normal(size=(n, layers)) * 0.5 + np.outer(np.where(y, 1.0, -0.5), grow)
    lock = rng.integers(0, layers, size=n)
    later = np.arange(layers)[None, :] >= lock[:, None]
    answer_rank = np.where(later, 0, rng.integers(1, 9, size=(n, layers)))
    layer_entropy = 3.0 - 0.4 * np.minimum(np.arange(layers), 2)[None, :] + 0.1 * rng.normal(size=(n, layers))
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    hidden = {}
    for site in ("resid", "mlp_out"):
        h = rng.normal(size=(layers, n, d)) + 1.0
        h[min(signal_layer, layers - 1)] += np.outer(np.where(y, 1.5, -1.5), direction)
        hidden[site] = h.astype(np.float32)
    ids = [make_sample_id("shapes-pope", split[i], str(i), f"hash{i // 6}") for i in range(n)]
    return ModelTruth(
        run_id=run_id,
        sample_ids=ids,
        split=split,
        image_id=image_id,
        label=label,
        answer=answer,
        correct=correct,
        metrics=metrics,
        truth_margin=truth_margin,
        answer_rank=answer_rank,
        layer_entropy=layer_entropy,
        hidden=hidden,
    )


def _rows(t: ModelTruth, layers: int) -> dict[str, list[dict]]:
    samples, layer_rows, hidden_rows = [], [], []
    for i, sid in enumerate(t.sample_ids):
        row = {
            "sample_id": sid,
            "dataset": "shapes-pope",
            "split": str(t.split[i]),
            "question_id": str(i),
            "image_id": str(t.image_id[i]),
            "question": "Is there a shape?",
            "object": "shape",
            "label": str(t.label[i]),
            "answer_text": "maybe" if t.answer[i] is None else f"{t.answer[i]}.",
            "answer": t.answer[i],
            "parse_status": "unknown" if t.answer[i] is None else "ok",
            # as `vrp ingest run` stores them: an unparsable answer has correct = False
            "correct": bool(t.correct[i]),
            "grid_h": 4,
            "grid_w": 4,
            "n_image_tokens": 16,
            "sc_k": 10,
            "sc_answer": t.answer[i],
        }
        for name, values in t.metrics.items():
            row[name] = int(values[i]) if name == "cluster_count" else float(values[i])
        samples.append(row)
        for layer in range(layers):
            layer_rows.append(
                {
                    "sample_id": sid,
                    "layer": layer,
                    "spatial_entropy": float(t.layer_entropy[i, layer]),
                    "spatial_entropy_norm": float(t.layer_entropy[i, layer] / np.log(16)),
                    "image_mass": 0.5,
                    "lens_truth_margin": float(t.truth_margin[i, layer]),
                    "lens_yes_no_margin": float(t.truth_margin[i, layer]),
                    "lens_answer_rank": int(t.answer_rank[i, layer]),
                    "attn_contrib": 0.1,
                    "mlp_contrib": 0.3,
                }
            )
            for site, h in t.hidden.items():
                hidden_rows.append({"sample_id": sid, "layer": layer, "site": site, "h": h[layer, i]})
    return {"samples": samples, "layers": layer_rows, "hidden": hidden_rows}


MASK_CELLS = (("high", 0.3, 0.3), ("low", 0.3, 0.05))
DESTROY_CELLS = (("probe", 0.25, 0.1), ("probe", 0.5, 0.3), ("random", 0.25, 0.02), ("random", 0.5, 0.05))


def _write_intervention(
    lake, base: dict, t: ModelTruth, rng: np.random.Generator, kind: str = "mask"
) -> None:
    """An intervention run whose cells (condition, level) flip a share of the right answers to wrong.

    mask: `high` flips 30%, `low` 5% (``t.interventions[condition]``); destroy: the `probe` order
    flips more than `random` (``t.interventions[f"destroy:{condition}:{level}"]``).
    """
    run = dict(
        base,
        base_run_id=base["run_id"],
        kind=kind,
        config={**base["config"], "kind": kind, "base": base["run_id"]},
    )
    run["run_id"] = make_run_id(run["config"])
    rows = []
    base_right = np.array([c is True for c in t.correct])
    for condition, level, flip in MASK_CELLS if kind == "mask" else DESTROY_CELLS:
        right = base_right & (rng.random(len(base_right)) >= flip)
        t.interventions[condition if kind == "mask" else f"destroy:{condition}:{level}"] = right
        for i, sid in enumerate(t.sample_ids):
            answer = t.label[i] if right[i] else ("no" if t.label[i] == "yes" else "yes")
            rows.append(
                {
                    "sample_id": sid,
                    "condition": condition,
                    "level": level,
                    "base_run_id": base["run_id"],
                    "setting": "ratio=0.3,layer=-1,seed=1" if kind == "mask" else "layer=-1,seed=1",
                    "answer": answer,
                    "parse_status": "ok",
                    "correct": bool(right[i]),
                    "yes_no_margin": 1.0 if answer == "yes" else -1.0,
                    "p_yes": 0.5,
                }
            )
    markers = [
        {"sample_id": sid, "dataset": "shapes-pope", "split": str(t.split[i]), "label": str(t.label[i])}
        for i, sid in enumerate(t.sample_ids)
    ]
    writer = lake.writer(run)
    writer.begin()
    writer.commit({"interventions": rows, "samples": markers})
    writer.finish()
    if kind == "mask":
        t.intervention_run_id = run["run_id"]
