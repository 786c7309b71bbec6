"""The study's combined reliability score, fitted and scored held-out.

Two models, each a logistic regression on z-scored features evaluated out of fold on the probes'
image-grouped folds (:func:`vrp.analysis.probes.make_folds`, same seed, so a question's fused score
never comes from a model that saw its image):

* **fusion** (the study's metric fusion): -H_s, C_k, the first-token probability, self-consistency,
  visual dependence (when condition runs exist: the first-token KL against each condition; the Δ
  truth margin is left out because it is read off the label's token) and the out-of-fold score of
  the best probe;
* **logit contributions** (the study's "combined" LLaVA model): the attention and MLP direct
  contributions to the truth logit at a chosen set of layers. As in the study these project onto
  the *label's* token, so the model knows which answer is right through its features: read its
  AUROC as how linearly the layers' votes separate, not as a label-free detector.

The z-scoring is fitted inside each training fold (a scaler that saw the test rows would leak their
mean and spread into the score). The reported coefficients come from one fit on every row, z-scored
on every row, so they read as "change in log-odds per standard deviation".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from vrp.analysis import compute, data, probes, stats
from vrp.lake import Lake

#: fusion features from `correlation_inputs`: (name, column, sign applied so larger = more reliable)
FUSION_SIGNALS: tuple[tuple[str, str, int], ...] = (
    ("-H_s", "spatial_entropy", -1),
    ("C_k", "cluster_count", 1),
    ("first-token probability", "top1_prob", 1),
    ("self-consistency", "sc_agreement", 1),
)
MAX_ITER = 1000


@dataclass
class FusionFit:
    """Held-out result of one logistic model on one run."""

    model: str
    run_id: str
    name: str
    features: list[str]
    auroc: float
    auroc_low: float
    auroc_high: float
    n: int
    n_correct: int
    folds: int
    coefficients: dict[str, float]
    intercept: float
    oof: np.ndarray = field(repr=False)
    sample_ids: np.ndarray = field(repr=False)
    fold_means: list[np.ndarray] = field(default_factory=list, repr=False)
    note: str | None = None

    def row(self) -> dict:
        return {
            "model": self.model,
            "run_id": self.run_id,
            "fit": self.name,
            "auroc": self.auroc,
            "auroc_low": self.auroc_low,
            "auroc_high": self.auroc_high,
            "n": self.n,
            "n_correct": self.n_correct,
            "folds": self.folds,
            "intercept": self.intercept,
            **{f"coef {k}": v for k, v in self.coefficients.items()},
        }


def oof_logistic(
    x: np.ndarray, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Out-of-fold P(correct) of a z-scored logistic regression; also each fold's scaler mean.

    Each fold's scaler is fitted on that fold's training rows only.
    """
    oof = np.full(len(y), np.nan)
    means = []
    for train, test in folds:
        scaler = StandardScaler().fit(x[train])
        fit = LogisticRegression(max_iter=MAX_ITER).fit(scaler.transform(x[train]), y[train])
        oof[test] = fit.predict_proba(scaler.transform(x[test]))[:, 1]
        means.append(scaler.mean_.copy())
    return oof, means


def fit_fusion(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    features: Sequence[str],
    *,
    name: str,
    model: str = "",
    run_id: str = "",
    sample_ids: np.ndarray | None = None,
    seed: int = probes.SEED,
    n_boot: int = stats.N_BOOT,
) -> FusionFit:
    """Held-out AUROC [bootstrap CI] and coefficients of a logistic model on the probes' folds."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).astype(int)
    plan = probes.make_folds(y, groups, seed=seed)
    oof, means = oof_logistic(x, y, plan.folds)
    if n_boot:
        auc, low, high = stats.auroc_ci(oof, y, n_boot=n_boot, seed=seed)
    else:
        auc, low, high = stats.auroc(oof, y), float("nan"), float("nan")
    z = StandardScaler().fit_transform(x)
    full = LogisticRegression(max_iter=MAX_ITER).fit(z, y)
    return FusionFit(
        model=model,
        run_id=run_id,
        name=name,
        features=list(features),
        auroc=auc,
        auroc_low=low,
        auroc_high=high,
        n=int(y.size),
        n_correct=int(y.sum()),
        folds=plan.n_splits,
        coefficients={f: float(c) for f, c in zip(features, full.coef_[0], strict=True)},
        intercept=float(full.intercept_[0]),
        oof=oof,
        sample_ids=np.arange(y.size) if sample_ids is None else sample_ids,
        fold_means=means,
        note=plan.note,
    )


def usable(x: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Drop features that are missing everywhere or constant, then rows missing any kept feature.

    Returns (matrix, kept feature names, kept-row mask).
    """
    keep = [j for j in range(x.shape[1]) if np.isfinite(x[:, j]).any() and np.nanstd(x[:, j]) > 0]
    sub = x[:, keep]
    rows = np.isfinite(sub).all(axis=1)
    return sub[rows], [names[j] for j in keep], rows


def fusion_inputs(
    lake: Lake,
    run_id: str,
    *,
    seed: int,
    n_boot: int,
    probe_scores: dict[str, float] | None = None,
    dependence: dict[tuple[str, str], dict[str, float]] | None = None,
) -> tuple[np.ndarray, list[str], dict]:
    """One run's fusion features [questions, features] and what goes with them (ids, y, groups).

    ``probe_scores`` (sample id -> out-of-fold best-probe score) and ``dependence`` (see
    :func:`vrp.analysis.compute.visual_dependence`) are read from the lake when not given.
    """
    rows = [r for r in data.query(lake, "correlation_inputs").to_pylist() if r["run_id"] == run_id]
    rows.sort(key=lambda r: r["sample_id"])
    ids = np.array([r["sample_id"] for r in rows], dtype=object)
    names = [name for name, _, _ in FUSION_SIGNALS]
    cols = [
        [np.nan if r[col] is None else sign * float(r[col]) for r in rows] for _, col, sign in FUSION_SIGNALS
    ]
    if dependence is None:
        dependence = compute.visual_dependence(lake)
    # label-free visual dependence only: the Δ truth margin is read off the label's token (at the last
    # layer it is positive almost exactly when the answer is right), so fusing it would leak y
    labels = sorted(
        {
            label
            for (rid, _), values in dependence.items()
            if rid == run_id
            for label in values
            if label.startswith(compute.dependence_label("kl", ""))
        }
    )
    for label in labels:
        names.append(label)
        cols.append([dependence.get((run_id, s), {}).get(label, np.nan) for s in ids])
    if probe_scores is None:
        got = compute.best_probe_scores(lake, run_id, seed=seed, n_boot=n_boot)
        probe_scores = {} if got is None else got[1]
    if probe_scores:
        names.append("best probe (out of fold)")
        cols.append([probe_scores.get(s, np.nan) for s in ids])
    x = np.array(cols, dtype=np.float64).T if rows else np.zeros((0, len(names)))
    meta = {
        "sample_ids": ids,
        "y": np.array([r["y"] for r in rows], dtype=int),
        "groups": np.array([r["image_id"] or r["sample_id"] for r in rows], dtype=object),
        "model": rows[0]["model"] if rows else "",
    }
    return x, names, meta


def contribution_inputs(
    lake: Lake, run_id: str, layers: Sequence[int] | None
) -> tuple[np.ndarray, list[str], dict]:
    """Attention and MLP direct contributions to the truth logit at ``layers`` (default: the last 6)."""
    s = data.scored_samples(lake, run_id)
    available, attn = data.layer_matrix(lake, run_id, "attn_contrib", s.sample_ids)
    _, mlp = data.layer_matrix(lake, run_id, "mlp_contrib", s.sample_ids)
    n = available.size
    if layers is None:
        chosen = available[-6:].tolist()
    else:
        chosen = sorted({layer + n if layer < 0 else layer for layer in layers})
        missing = sorted(set(chosen) - set(available.tolist()))
        if missing:
            raise ValueError(
                f"run {run_id} has no contributions at layers {missing} (has {available.tolist()})"
            )
    index = [int(np.flatnonzero(available == layer)[0]) for layer in chosen]
    names = [f"attn L{layer}" for layer in chosen] + [f"mlp L{layer}" for layer in chosen]
    x = np.hstack([attn[:, index], mlp[:, index]]) if n else np.zeros((0, 0))
    meta = {"sample_ids": s.sample_ids, "y": s.y.astype(int), "groups": s.groups, "model": s.model}
    return x, names, meta


def run_fusions(
    lake: Lake,
    *,
    models: Sequence[str] | None = None,
    contrib_layers: Sequence[int] | None = None,
    seed: int = probes.SEED,
    n_boot: int = stats.N_BOOT,
    probe_scores: dict[str, dict[str, float]] | None = None,
) -> tuple[list[FusionFit], list[str]]:
    """Both models on every image run (optionally some models); (fits, skipped-run notes).

    ``probe_scores`` maps a run id to its best probe's out-of-fold scores when the caller has them.
    """
    fits, skipped = [], []
    dependence = compute.visual_dependence(lake)
    for run in data.base_runs(lake, models):
        run_id = run["run_id"]
        known = None if probe_scores is None else probe_scores.get(run_id, {})
        for name in ("fusion", "logit contributions"):
            try:
                if name == "fusion":
                    x, names, meta = fusion_inputs(
                        lake, run_id, seed=seed, n_boot=n_boot, probe_scores=known, dependence=dependence
                    )
                else:
                    x, names, meta = contribution_inputs(lake, run_id, contrib_layers)
                sub, kept, rows = usable(x, names)
                if not kept:
                    raise probes.ProbeError("no usable feature")
                fits.append(
                    fit_fusion(
                        sub,
                        meta["y"][rows],
                        meta["groups"][rows],
                        kept,
                        name=name,
                        model=meta["model"],
                        run_id=run_id,
                        sample_ids=meta["sample_ids"][rows],
                        seed=seed,
                        n_boot=n_boot,
                    )
                )
            except (probes.ProbeError, ValueError) as exc:
                skipped.append(f"{run['model']} run {run_id}: no {name} model ({exc})")
    return fits, skipped
