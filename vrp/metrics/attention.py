"""Attention-map metrics: spatial entropy and cluster count (docs/ARCHITECTURE.md section 4.1).

These are definitions of stored signals, so they live outside both rooms that use them: the
capture engine calls them on every layer's map at ingest time, and analyses can call them again
on any aggregate map read from the lake. Pure numpy; scikit-learn's DBSCAN is imported only when
``cluster_count`` runs, so a capture that stores no cluster counts never loads scikit-learn.
"""

from __future__ import annotations

import numpy as np

ENTROPY_DELTA = 1e-9
CLUSTER_PERCENTILE = 90.0
CLUSTER_EPS = 1.5
CLUSTER_MIN_SAMPLES = 3


def normalise_map(values: np.ndarray) -> np.ndarray:
    """Renormalise non-negative attention mass to sum to 1 (a zero map stays uniform, never NaN)."""
    values = np.asarray(values, dtype=np.float64)
    total = values.sum(axis=-1, keepdims=True)
    uniform = np.full_like(values, 1.0 / values.shape[-1])
    return np.where(total > 0, values / np.where(total > 0, total, 1.0), uniform)


def spatial_entropy(attention_map: np.ndarray) -> float:
    """H_s(M) = -sum M log(M + 1e-9) in nats, on an L1-normalised map of any shape."""
    m = normalise_map(np.asarray(attention_map, dtype=np.float64).ravel())
    return float(-(m * np.log(m + ENTROPY_DELTA)).sum())


def normalised_entropy(entropy: float, n_cells: int) -> float | None:
    """H_s / ln(N): 1 for a uniform map over N cells, 0 for a single peak, whatever the grid size.

    It is what makes maps of different grids comparable (Qwen2-VL's grid varies per image). A
    one-cell map has no spread to measure, so it gets None rather than a division by ln 1 = 0.
    """
    if n_cells < 2:
        return None
    return float(entropy / np.log(n_cells))


def cluster_count(attention_map: np.ndarray) -> int:
    """C_k(M): DBSCAN clusters (eps 1.5, min_samples 3) of the cells at or above the 90th percentile.

    The map must be 2-D (grid_h x grid_w). Coordinates are the integer (row, col) of each cell,
    unweighted, so eps 1.5 means 8-connectivity. Fewer than three cells above the threshold
    gives 0, as does a map where every surviving cell is noise.
    """
    grid = np.asarray(attention_map, dtype=np.float64)
    if grid.ndim != 2:
        raise ValueError(f"cluster_count needs a 2-D grid, got shape {grid.shape}")
    threshold = np.percentile(grid, CLUSTER_PERCENTILE)
    cells = np.argwhere(grid >= threshold)
    if len(cells) < CLUSTER_MIN_SAMPLES:
        return 0
    from sklearn.cluster import DBSCAN  # only here: see the module docstring

    labels = DBSCAN(eps=CLUSTER_EPS, min_samples=CLUSTER_MIN_SAMPLES).fit_predict(cells)
    return int(len(set(labels.tolist()) - {-1}))
