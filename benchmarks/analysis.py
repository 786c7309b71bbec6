"""Benchmark of the analyses: VRP's probe sweep against a plain scikit-learn loop, and the correlation table.

    .venv/bin/python benchmarks/analysis.py            # n = 3,000, 32 layers, d = 4,096 (a few minutes)
    .venv/bin/python benchmarks/analysis.py --layers 4 # quicker

Probe sweep: the same synthetic hidden states (a residual stream: each layer adds to the last, the
label's direction grows with depth) and the same image-grouped 5 folds go to

- VRP: ``vrp.analysis.probes.logreg_folds`` (all folds in one blocked L-BFGS per layer), and
- the plain loop: per layer and fold, ``StandardScaler`` + ``LogisticRegression()`` (lbfgs, C = 1,
  max_iter = 100), scored by ``decision_function`` on the held-out fold.

Both solve the same objective; the script prints both times, their ratio and the largest
difference of out-of-fold AUROC over layers. Correlation table: 10 metrics x 3 models of 3,000
answers (+ pooled), R_pb with p, Fisher CI and a 10,000-resample bootstrap CI, with and without
the bootstrap CI of the AUROC. Layers are generated one at a time, so memory stays near 1 GB.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from vrp.analysis import probes, stats


def residual_stream(n: int, d: int, layers: int, y: np.ndarray, seed: int):
    """Yield (layer, n x d float32): low-rank structure plus noise, accumulated layer by layer."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(64, d)).astype(np.float32) / 8
    latent = rng.normal(size=(n, 64)).astype(np.float32)
    direction = rng.normal(size=d).astype(np.float32)
    direction /= np.linalg.norm(direction)
    h = latent @ basis + 3.0
    signed = (y - 0.5).astype(np.float32)
    for layer in range(layers):
        h = h + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
        h += np.outer(signed, direction) * (0.3 * (layer + 1) / max(layers, 1) * 4)
        yield layer, h


def sklearn_loop(x: np.ndarray, y: np.ndarray, folds, threads: int | None) -> np.ndarray:
    with threadpool_limits(threads):
        return _sklearn_loop(x, y, folds)


def _sklearn_loop(x: np.ndarray, y: np.ndarray, folds) -> np.ndarray:
    oof = np.empty(y.size)
    for tr, te in folds:
        scaler = StandardScaler().fit(x[tr])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression().fit(scaler.transform(x[tr]), y[tr])
        oof[te] = clf.decision_function(scaler.transform(x[te]))
    return oof


def bench_probes(n: int, d: int, layers: int, seed: int, threads: int | None) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.7).astype(int)
    groups = np.arange(n) // 6
    plan = probes.make_folds(y, groups, seed=seed)
    t_vrp = t_sk = 0.0
    diffs = []
    print(
        f"probe sweep: n={n}, d={d}, {layers} layers x {plan.n_splits} folds, threads: {threads or 'default'}"
    )
    print(f"{'layer':>5} {'VRP s':>7} {'sklearn s':>9} {'AUROC VRP':>9} {'AUROC sk':>9} {'|diff|':>7}")
    for layer, x in residual_stream(n, d, layers, y, seed):
        t0 = time.perf_counter()
        fit = probes.logreg_folds(x, y, plan.folds, threads=threads)
        a_vrp = roc_auc_score(y, fit.oof)
        t1 = time.perf_counter()
        a_sk = roc_auc_score(y, sklearn_loop(x, y, plan.folds, threads))
        t2 = time.perf_counter()
        t_vrp += t1 - t0
        t_sk += t2 - t1
        diffs.append(abs(a_vrp - a_sk))
        row = f"{layer:>5} {t1 - t0:>7.2f} {t2 - t1:>9.2f} {a_vrp:>9.4f} {a_sk:>9.4f} {diffs[-1]:>7.4f}"
        print(row, flush=True)
    print(f"\nVRP probe sweep      {t_vrp:8.1f} s")
    print(f"plain sklearn loop   {t_sk:8.1f} s")
    print(f"speed-up             {t_sk / t_vrp:8.2f} x   (target >= 3x)")
    print(f"max |AUROC diff|     {max(diffs):8.4f}     (target <= 0.005)")


def bench_correlations(n: int, seed: int, n_boot: int) -> None:
    rng = np.random.default_rng(seed)
    groups = {}
    for model in ("llava", "paligemma", "qwen2vl"):
        y = rng.random(n) < 0.7
        metrics = {f"metric{k}": rng.normal(size=n) + 0.05 * k * y for k in range(9)}
        metrics["cluster_count"] = rng.integers(0, 4, size=n).astype(float)
        groups[model] = (metrics, y)
    for with_auc in (False, True):
        t0 = time.perf_counter()
        rows = stats.correlation_tables(groups, n_boot=n_boot, seed=seed, with_auroc_ci=with_auc)
        dt = time.perf_counter() - t0
        what = "R_pb + p + Fisher CI + bootstrap CI" + (" + AUROC bootstrap CI" if with_auc else "")
        print(
            f"correlation table ({len(rows)} cells, {n_boot:,} resamples): {what}: {dt:.2f} s"
            + ("   (target <= 2 s)" if not with_auc else "")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--n-boot", type=int, default=stats.N_BOOT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-probes", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="Threads for both sides (sklearn's BLAS, VRP's block workers); default: their own.",
    )
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{platform.processor() or platform.machine()}, {cpus} CPUs usable, load {os.getloadavg()[0]:.1f}")
    bench_correlations(args.n, args.seed, args.n_boot)
    if not args.skip_probes:
        bench_probes(args.n, args.d, args.layers, args.seed, args.threads)


if __name__ == "__main__":
    main()
