"""Attention-map metrics: spatial entropy and cluster count (docs/ARCHITECTURE.md section 4.1).

These are definitions of stored signals, so they live outside both rooms that use them: the
capture engine calls them on every layer's map at ingest time, and analyses can call them again
on any aggregate map read from the lake. Pure numpy, but for the connected-component labelling
of ``cluster_counts`` (scipy.ndimage), imported only when a cluster count is computed.

The cluster count is defined as DBSCAN's (eps 1.5, min_samples 3) and computed without running
DBSCAN: on integer cell coordinates eps 1.5 reaches exactly the 8 neighbours, so a *core* cell is
a selected cell with at least two selected neighbours, clusters are the 8-connected components of
core cells (DBSCAN joins two points when one is a core point within eps of the other, and a
non-core border cell never joins two clusters), and non-core cells only attach to a cluster or are
noise. So C_k is the number of 8-connected components of the core cells: a 3x3 box sum and one
labelling for a whole stack of maps, instead of one DBSCAN fit per map (docs/ARCHITECTURE.md 4.1;
tests/unit/test_attention_metrics.py checks the equality against scikit-learn's DBSCAN).
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
    positive = total > 0
    if positive.all():  # the common case: one division, no uniform array to build
        return values / total
    out = values / np.where(positive, total, 1.0)
    np.copyto(out, 1.0 / values.shape[-1], where=~positive)
    return out


def spatial_entropy(attention_map: np.ndarray) -> float:
    """H_s(M) = -sum M log(M + 1e-9) in nats, on an L1-normalised map of any shape."""
    return float(spatial_entropies(np.asarray(attention_map, dtype=np.float64).ravel()))


def spatial_entropies(maps: np.ndarray) -> np.ndarray:
    """H_s of every map along the last axis ([..., N] -> [...]), each L1-normalised first."""
    m = normalise_map(np.asarray(maps, dtype=np.float64))
    return -(m * np.log(m + ENTROPY_DELTA)).sum(-1)


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
    gives 0, as does a map where every surviving cell is noise. See :func:`cluster_counts`.
    """
    grid = np.asarray(attention_map, dtype=np.float64)
    if grid.ndim != 2:
        raise ValueError(f"cluster_count needs a 2-D grid, got shape {grid.shape}")
    return int(cluster_counts(grid[None])[0])


def cluster_counts(grids: np.ndarray) -> np.ndarray:
    """C_k of each map in a stack [M, grid_h, grid_w] (one grid for all), as int64 [M].

    The same number as :func:`cluster_count` per map, computed for the whole stack at once: the
    90th-percentile threshold per map, the core cells (a selected cell whose 3x3 neighbourhood,
    itself included, holds at least ``CLUSTER_MIN_SAMPLES`` selected cells), and the 8-connected
    components of the core cells (module docstring: that is DBSCAN's cluster count).
    """
    from scipy import ndimage  # only here: see the module docstring

    grids = np.asarray(grids, dtype=np.float64)
    if grids.ndim != 3:
        raise ValueError(f"cluster_counts needs a stack of 2-D grids [M, h, w], got shape {grids.shape}")
    count, height, width = grids.shape
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    threshold = np.percentile(grids.reshape(count, -1), CLUSTER_PERCENTILE, axis=1)
    selected = grids >= threshold[:, None, None]
    padded = np.pad(selected.astype(np.int32), ((0, 0), (1, 1), (1, 1)))
    around = sum(
        padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    )
    core = selected & (around >= CLUSTER_MIN_SAMPLES)
    within_map = np.zeros((3, 3, 3), dtype=bool)
    within_map[1] = True  # 8-connectivity inside each map, never across maps of the stack
    labels, found = ndimage.label(core, structure=within_map)
    if not found:
        return np.zeros(count, dtype=np.int64)
    # every component lies in one map: count each where its first cell is
    values, first = np.unique(labels.reshape(-1), return_index=True)
    owner = first[values > 0] // (height * width)  # label 0 is the background
    return np.bincount(owner, minlength=count).astype(np.int64)
