"""Held-out probes of correctness on hidden states (docs/ARCHITECTURE.md section 4.7), numpy + sklearn.

What it offers:

- ``make_folds(y, groups)``: stratified K-fold grouped by image (POPE's splits share images, so an
  image in both train and test would leak); fewer folds, with a note saying so, when the data
  cannot fill five.
- ``logreg_folds(X, y, plan)``: L2 logistic regression on per-fold standardised features, the same
  problem scikit-learn's ``LogisticRegression(lbfgs)`` solves, but all folds in one optimisation
  (see below), returning out-of-fold decision values.
- ``probe_sweep(layers, y, groups)``: per-layer probes, the last-5 concatenation and the 2-layer
  MLP at the best layer, each with an out-of-fold AUROC and its bootstrap CI (``ProbeResult``).
- ``rank_neurons_l1`` / ``rank_neurons_l2``: the "probe neuron" rankings used by interventions.

Why the solver is not a loop over ``LogisticRegression``: with n = 3,000 and d = 4,096 each lbfgs
iteration is two passes over the data matrix, and a plain loop makes those passes once per fold.
Folding each fold's standardisation into its weights (x_std . w = x . (w / sd) - mu . (w / sd))
lets one float32 matrix product ``X @ V`` (d x folds) score every fold at once and ``X.T @ R``
give every fold's gradient, so a joint L-BFGS over the five independent objectives reads the
matrix once per iteration for all folds. The objectives separate, so the joint optimum is each
fold's own optimum, and the stopping rule (max |gradient| <= tol) holds for every fold.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from vrp.analysis.stats import N_BOOT, auroc_ci

N_SPLITS = 5
SEED = 0
LAST_K = 5
L1_C = 0.1
L1_TOP_VARIANCE = 1000
_BLOCK_BYTES = 1 << 19
_PARALLEL_ELEMENTS = 1 << 20
MLP_HIDDEN = 256


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ProbeError(ValueError):
    """The data cannot support a held-out probe (e.g. one class only, or a single image)."""


@dataclass(frozen=True)
class FoldPlan:
    """Train/test index pairs of a grouped, stratified K-fold; ``note`` says why K < requested."""

    folds: list[tuple[np.ndarray, np.ndarray]]
    n_splits: int
    note: str | None = None


def make_folds(
    y: Sequence | np.ndarray, groups: Sequence | np.ndarray, *, n_splits: int = N_SPLITS, seed: int = SEED
) -> FoldPlan:
    """Stratified K-fold grouped by image, shuffled with a seed.

    K is lowered when there are fewer images than K, or fewer images holding a class member than
    K (a fold without positives scores nothing); fewer than 2 folds is an error.
    """
    yy = np.asarray(y).astype(int)
    g = np.asarray(groups)
    if yy.size != g.size:
        raise ProbeError(f"{yy.size} labels but {g.size} group ids")
    classes = np.unique(yy)
    if classes.size < 2:
        raise ProbeError("only one class present: every answer is right (or wrong); nothing to probe")
    per_class = min(np.unique(g[yy == c]).size for c in classes)
    k = min(n_splits, np.unique(g).size, per_class)
    if k < 2:
        raise ProbeError(
            f"cannot cross-validate: {np.unique(g).size} images, {per_class} images with "
            "the rarer outcome; need at least 2 of each"
        )
    note = None
    if k < n_splits:
        note = (
            f"{k} folds instead of {n_splits}: only {np.unique(g).size} images and {per_class} images "
            "with the rarer outcome"
        )
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" is covered by the note
        folds = [(tr, te) for tr, te in splitter.split(np.zeros(yy.size), yy, g)]
    return FoldPlan(folds=folds, n_splits=k, note=note)


@dataclass(frozen=True)
class FoldFit:
    """Out-of-fold decision values and the per-fold weights in standardised units (d x folds)."""

    oof: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    n_iter: int


def logreg_folds(
    X: np.ndarray,
    y: Sequence | np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    C: float = 1.0,
    tol: float = 1e-4,
    max_iter: int = 100,
    init: np.ndarray | None = None,
    threads: int | None = None,
) -> FoldFit:
    """L2 logistic regression per fold on that fold's standardised training rows, solved jointly.

    Per fold f this minimises (1/n_f) sum log(1 + exp(-s_i m_i)) + |w_f|^2 / (2 C n_f) with an
    unpenalised intercept, i.e. scikit-learn's ``StandardScaler`` + ``LogisticRegression(C=C)``
    objective; ``max_iter`` and ``tol`` mean what they mean there (L-BFGS iterations, max |grad|).
    ``init`` (d x folds, standardised weights) warm-starts, e.g. from the previous layer.
    Test rows of a fold may be empty (one "fold" training on all rows gives a full-data fit).
    ``threads`` (default: the usable CPUs) share the row blocks of each pass.
    """
    x = np.asarray(X, dtype=np.float32)
    yy = np.asarray(y).astype(np.float64)
    n, d = x.shape
    nf = len(folds)
    train = np.zeros((n, nf), dtype=np.float32)
    for f, (tr, _) in enumerate(folds):
        train[tr, f] = 1.0
    n_tr = train.sum(axis=0, dtype=np.float64)
    weight = (train / n_tr).astype(np.float32)
    ypos = np.broadcast_to((yy > 0.5)[:, None], (n, nf)).astype(np.float32)
    lam = 1.0 / (C * n_tr)
    # Row blocks small enough to stay in L2: each block is scored and its gradient taken while it
    # is still in cache, so one iteration reads the matrix once (two separate products read it twice).
    step = max(16, _BLOCK_BYTES // (4 * d))
    blocks = [slice(i, min(i + step, n)) for i in range(0, n, step)]
    # Small problems stay on one thread: handing tiny blocks between threads costs more than it gives.
    default = _default_threads() if n * d >= _PARALLEL_ELEMENTS else 1
    workers = max(1, min(threads or default, len(blocks)))
    chunks = [blocks[i::workers] for i in range(workers)]
    margins = np.empty((n, nf), dtype=np.float32)
    # Centred copy: float32 products of uncentred states (offsets of several units) would cancel.
    xc = np.empty_like(x)

    def moments(chunk: list[slice], centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s1 = np.zeros((d, nf), dtype=np.float64)
        s2 = np.zeros((d, nf), dtype=np.float64)
        for s in chunk:
            xb = np.subtract(x[s], centre, out=xc[s])
            s1 += xb.T @ train[s]
            s2 += (xb * xb).T @ train[s]
        return s1, s2

    def part(chunk: list[slice], v32: np.ndarray, shift: np.ndarray) -> np.ndarray:
        g = np.zeros((d, nf), dtype=np.float32)
        for s in chunk:
            xb = xc[s]
            m = np.matmul(xb, v32, out=margins[s])
            m += shift
            r = expit(m)
            r -= ypos[s]
            r *= weight[s]
            g += xb.T @ r
        return g

    with ThreadPoolExecutor(max_workers=workers) as pool, threadpool_limits(1):
        # BLAS threads on 1 MB blocks only contend; our own threads split the blocks instead.
        centre = sum(pool.map(lambda c: sum(x[s].sum(axis=0, dtype=np.float64) for s in c), chunks)) / n
        parts = list(pool.map(lambda c: moments(c, centre.astype(np.float32)), chunks))
        mu = sum(p[0] for p in parts) / n_tr
        sd = np.sqrt(np.maximum(sum(p[1] for p in parts) / n_tr - mu * mu, 0.0))
        sd[sd <= 1e-7 * np.maximum(1.0, np.abs(centre))[:, None]] = 1.0  # constant column, as StandardScaler

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w = theta[: d * nf].reshape(d, nf)
            v = w / sd
            shift = (theta[d * nf :] - (mu * v).sum(axis=0)).astype(np.float32)
            g = sum(pool.map(lambda c: part(c, v.astype(np.float32), shift), chunks)).astype(np.float64)
            m = margins.astype(np.float64)
            loss = float((np.logaddexp(0.0, np.where(ypos > 0, -m, m)) * weight).sum())
            rsum = ((expit(m) - ypos) * weight).sum(axis=0)
            value = loss + 0.5 * float((lam * (w * w).sum(axis=0)).sum())
            gw = (g - mu * rsum) / sd + lam * w
            return value, np.concatenate([gw.ravel(), rsum])

        theta0 = np.zeros(d * nf + nf)
        if init is not None:
            theta0[: d * nf] = np.asarray(init, dtype=np.float64).ravel()
        res = minimize(
            objective,
            theta0,
            jac=True,
            method="L-BFGS-B",
            options={
                "maxiter": max_iter,
                "gtol": tol,
                "ftol": 64 * np.finfo(float).eps,
                "maxcor": 10,
                "maxls": 50,
            },
        )
        objective(res.x)  # margins at the solution (the last evaluation may have been a trial point)
    oof = np.full(n, np.nan)
    for f, (_, te) in enumerate(folds):
        oof[te] = margins[te, f]
    w = res.x[: d * nf].reshape(d, nf)
    return FoldFit(oof=oof, coef=w, intercept=res.x[d * nf :], n_iter=int(res.nit))


def mlp_folds(
    X: np.ndarray,
    y: Sequence | np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    hidden: int = MLP_HIDDEN,
    max_iter: int = 200,
    seed: int = SEED,
) -> np.ndarray:
    """Out-of-fold P(correct) of a 2-layer MLP (one ReLU hidden layer) on standardised features."""
    x = np.asarray(X, dtype=np.float32)
    yy = np.asarray(y).astype(int)
    oof = np.full(yy.size, np.nan)
    for tr, te in folds:
        mu = x[tr].mean(axis=0)
        sd = x[tr].std(axis=0)
        sd[sd == 0] = 1.0
        clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=max_iter, random_state=seed)
        # Threaded BLAS on these small products only contends (measured: 20x slower on 2 busy cores).
        with warnings.catch_warnings(), threadpool_limits(1 if x.shape[0] * x.shape[1] < 1 << 22 else None):
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit((x[tr] - mu) / sd, yy[tr])
        oof[te] = clf.predict_proba((x[te] - mu) / sd)[:, 1]
    return oof


@dataclass(frozen=True)
class ProbeResult:
    """One probe's held-out performance; ``scores`` are its out-of-fold scores (higher = correct)."""

    site: str
    layer: int
    probe: str
    auroc: float
    auroc_low: float
    auroc_high: float
    accuracy: float
    n: int
    n_pos: int
    folds: int
    seed: int
    note: str | None = None
    scores: np.ndarray = field(default=None, repr=False, compare=False)

    def row(self) -> dict:
        """The ``probe_layers`` row (without run_id/model)."""
        return {
            "site": self.site,
            "layer": self.layer,
            "probe": self.probe,
            "auroc": self.auroc,
            "auroc_low": self.auroc_low,
            "auroc_high": self.auroc_high,
            "accuracy": self.accuracy,
            "n": self.n,
            "n_pos": self.n_pos,
            "folds": self.folds,
            "seed": self.seed,
        }


def _result(
    site: str,
    layer: int,
    probe: str,
    scores: np.ndarray,
    y: np.ndarray,
    plan: FoldPlan,
    threshold: float,
    n_boot: int,
    seed: int,
) -> ProbeResult:
    point, lo, hi = auroc_ci(scores, y, n_boot=n_boot, seed=seed)
    acc = float(np.mean((scores > threshold) == (y > 0.5)))
    return ProbeResult(
        site=site,
        layer=layer,
        probe=probe,
        auroc=point,
        auroc_low=lo,
        auroc_high=hi,
        accuracy=acc,
        n=int(y.size),
        n_pos=int(y.sum()),
        folds=plan.n_splits,
        seed=seed,
        note=plan.note,
        scores=scores,
    )


def probe_sweep(
    layers: Sequence[int],
    load: Callable[[int], np.ndarray],
    y: Sequence | np.ndarray,
    groups: Sequence | np.ndarray,
    *,
    site: str = "resid",
    n_splits: int = N_SPLITS,
    seed: int = SEED,
    C: float = 1.0,
    n_boot: int = N_BOOT,
    last_k: int = LAST_K,
    mlp: bool = True,
    mlp_max_iter: int = 200,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> list[ProbeResult]:
    """Logistic probe per layer, the last-``last_k`` concatenation, and the MLP at the best layer.

    ``load(layer)`` returns that layer's n x d matrix, rows aligned with y and groups; layers are
    loaded one at a time so a 32-layer model never sits in memory at once (only the last k are
    kept for the concatenation). Every AUROC is out-of-fold on the same grouped folds.
    """
    yy = np.asarray(y).astype(np.float64)
    plan = make_folds(yy, groups, n_splits=n_splits, seed=seed)
    order = sorted(layers)
    top = order[-last_k:] if len(order) >= last_k else []
    results: list[ProbeResult] = []
    kept: dict[int, np.ndarray] = {}
    for layer in progress(order) if progress else order:
        x = np.asarray(load(layer), dtype=np.float32)
        fit = logreg_folds(x, yy, plan.folds, C=C)
        results.append(_result(site, layer, "logreg", fit.oof, yy, plan, 0.0, n_boot, seed))
        if layer in top:
            kept[layer] = x
    if top:
        fit = logreg_folds(np.hstack([kept[t] for t in top]), yy, plan.folds, C=C)
        results.append(_result(site, top[-1], f"last{last_k}", fit.oof, yy, plan, 0.0, n_boot, seed))
    if mlp and results:
        best = best_layer(results)
        x = kept[best] if best in kept else np.asarray(load(best), dtype=np.float32)
        oof = mlp_folds(x, yy, plan.folds, max_iter=mlp_max_iter, seed=seed)
        results.append(_result(site, best, "mlp", oof, yy, plan, 0.5, n_boot, seed))
    return results


def best_layer(results: Iterable[ProbeResult]) -> int:
    """The layer whose logistic probe has the highest out-of-fold AUROC (earliest on ties).

    Choosing it on the same folds that score it is a mild selection bias (max over layers); the
    report says so next to the number.
    """
    return max((r for r in results if r.probe == "logreg"), key=lambda r: (r.auroc, -r.layer)).layer


@dataclass(frozen=True)
class NeuronRank:
    """One coordinate of a layer's MLP output and its probe weight; rank 1 is the most important."""

    neuron: int
    coef: float
    rank: int


def _standardise(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0)
    sd[sd == 0] = 1.0
    return (x - x.mean(axis=0)) / sd


def rank_neurons_l1(
    X: np.ndarray,
    y: Sequence | np.ndarray,
    *,
    C: float = L1_C,
    top_variance: int = L1_TOP_VARIANCE,
    seed: int = SEED,
) -> list[NeuronRank]:
    """Probe neurons (docs/ARCHITECTURE.md section 4.7): L1 logistic (C = 0.1) on high-variance coordinates.

    Fitted on all samples: this is a ranking for interventions, not an evaluation (the held-out
    numbers come from ``probe_sweep``). Coordinates are ranked by |coefficient| (standardised
    units), ties broken by variance; only the ``top_variance`` candidates are ranked.
    """
    x = np.asarray(X, dtype=np.float64)
    var = x.var(axis=0)
    cand = np.argsort(-var, kind="stable")[: min(top_variance, x.shape[1])]
    clf = LogisticRegression(C=C, l1_ratio=1.0, solver="saga", max_iter=1000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(_standardise(x[:, cand]), np.asarray(y).astype(int))
    coef = clf.coef_[0]
    order = np.lexsort((np.arange(cand.size), -np.abs(coef)))
    return [NeuronRank(neuron=int(cand[j]), coef=float(coef[j]), rank=i + 1) for i, j in enumerate(order)]


def rank_neurons_l2(X: np.ndarray, y: Sequence | np.ndarray, *, C: float = 1.0) -> list[NeuronRank]:
    """Every coordinate ranked by |coefficient| of an L2 logistic probe on all samples (standardised).

    This is the order of the destruction sweep (docs/ARCHITECTURE.md section 5): the most predictive
    coordinates go first.
    """
    x = np.asarray(X, dtype=np.float32)
    n = x.shape[0]
    fit = logreg_folds(x, y, [(np.arange(n), np.arange(0))], C=C, max_iter=200)
    coef = fit.coef[:, 0]
    order = np.lexsort((np.arange(coef.size), -np.abs(coef)))
    return [NeuronRank(neuron=int(j), coef=float(coef[j]), rank=i + 1) for i, j in enumerate(order)]
