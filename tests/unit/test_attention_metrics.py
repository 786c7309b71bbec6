"""Spatial entropy and cluster count on maps whose values are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vrp.metrics.attention import (
    CLUSTER_EPS,
    CLUSTER_MIN_SAMPLES,
    CLUSTER_PERCENTILE,
    cluster_count,
    cluster_counts,
    normalise_map,
    normalised_entropy,
    spatial_entropies,
    spatial_entropy,
)


def test_uniform_map_has_entropy_log_n() -> None:
    grid = np.full((10, 10), 0.01)
    # -sum (1/100) log(1/100 + 1e-9) = log(100) up to the 1e-9 guard
    assert spatial_entropy(grid) == pytest.approx(math.log(100), abs=1e-6)


def test_single_peak_has_zero_entropy() -> None:
    grid = np.zeros((6, 6))
    grid[2, 3] = 5.0  # renormalised to 1
    assert spatial_entropy(grid) == pytest.approx(0.0, abs=1e-8)


def test_two_equal_cells_have_entropy_log_two() -> None:
    grid = np.zeros((4, 4))
    grid[0, 0] = grid[3, 3] = 1.0
    assert spatial_entropy(grid) == pytest.approx(math.log(2), abs=1e-8)


def test_two_separated_blobs_are_two_clusters() -> None:
    grid = np.zeros((10, 10))
    grid[0:2, 0:3] = 1.0  # 6 cells top-left
    grid[7:9, 6:9] = 1.0  # 6 cells bottom-right, far beyond eps 1.5
    # 12 of 100 cells are at the maximum; the 90th percentile of the values is 1.0
    assert cluster_count(grid) == 2


def test_diagonal_neighbours_join_one_cluster() -> None:
    grid = np.zeros((10, 10))
    for i in range(10):
        grid[i, i] = 1.0  # a diagonal line: 8-connectivity (eps 1.5) makes it one cluster
    assert cluster_count(grid) == 1


def test_blob_below_minimum_is_noise() -> None:
    # 90 low distinct values and exactly 10 high cells: a 2-cell blob (below min_samples 3)
    # and 8 isolated cells at least 3 apart; all of them are DBSCAN noise.
    grid = np.linspace(0.0, 0.01, 100).reshape(10, 10)
    for cell in [(0, 0), (0, 1), (0, 4), (0, 7), (3, 0), (3, 3), (3, 6), (3, 9), (6, 2), (6, 5)]:
        grid[cell] = 1.0
    assert (grid >= np.percentile(grid, 90)).sum() == 10
    assert cluster_count(grid) == 0
    grid[1, 0] = 1.0  # a third touching cell turns the blob into a cluster
    grid[9, 9] = 0.0
    assert cluster_count(grid) == 1


def test_fewer_than_three_cells_give_zero() -> None:
    # on a 2x2 grid the 90th percentile keeps at most one distinct maximum cell
    assert cluster_count(np.array([[0.1, 0.2], [0.3, 0.4]])) == 0


def test_uniform_map_is_one_cluster() -> None:
    # every cell equals the 90th percentile, so all of them pass and touch: one cluster
    assert cluster_count(np.full((5, 5), 0.04)) == 1


def test_normalise_map_keeps_zero_maps_finite() -> None:
    assert np.allclose(normalise_map(np.zeros(4)), 0.25)
    assert np.allclose(normalise_map(np.array([1.0, 3.0])), [0.25, 0.75])


def test_normalised_entropy_is_one_for_uniform_and_zero_for_a_peak() -> None:
    uniform = np.full((4, 6), 1.0)
    assert normalised_entropy(spatial_entropy(uniform), 24) == pytest.approx(1.0, abs=1e-6)
    peak = np.zeros((4, 6))
    peak[1, 1] = 1.0
    assert normalised_entropy(spatial_entropy(peak), 24) == pytest.approx(0.0, abs=1e-8)
    # two equal cells of 16: ln 2 / ln 16 = 1/4 exactly
    two = np.zeros(16)
    two[[0, 5]] = 1.0
    assert normalised_entropy(spatial_entropy(two), 16) == pytest.approx(0.25, abs=1e-8)
    assert normalised_entropy(0.0, 1) is None


def _dbscan_count(grid: np.ndarray) -> int:
    """The definition run literally: scikit-learn's DBSCAN on the passing cells' coordinates."""
    from sklearn.cluster import DBSCAN

    cells = np.argwhere(grid >= np.percentile(grid, CLUSTER_PERCENTILE))
    if len(cells) < CLUSTER_MIN_SAMPLES:
        return 0
    labels = DBSCAN(eps=CLUSTER_EPS, min_samples=CLUSTER_MIN_SAMPLES).fit_predict(cells)
    return len(set(labels.tolist()) - {-1})


@pytest.mark.parametrize("shape", [(24, 24), (16, 16), (17, 23), (5, 7), (1, 9), (3, 3), (2, 2)])
def test_cluster_counts_equal_dbscan(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    count = 40
    blobs = np.zeros((count, *shape))
    for grid in blobs:  # crosses of two to four cells at random places: touching, apart, at edges
        for _ in range(5):
            row, col = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            grid[row, col : col + 2] = grid[row : row + 2, col] = 1.0
    stacks = [
        rng.random((count, *shape)),  # smooth attention-like maps
        rng.random((count, *shape)) ** 8,  # a few peaks
        rng.integers(0, 3, (count, *shape)).astype(float),  # ties at the threshold
        (rng.random((count, *shape)) > 0.85).astype(float),  # sparse binary
        np.full((count, *shape), 0.04),  # uniform: every cell passes
        blobs,
    ]
    for grids in stacks:
        expected = [_dbscan_count(grid) for grid in grids]
        assert cluster_counts(grids).tolist() == expected
        assert [cluster_count(grid) for grid in grids] == expected


def test_cluster_counts_never_join_maps_of_a_stack() -> None:
    # two maps whose blobs touch across the boundary between them if the stack were one image
    top = np.zeros((4, 4))
    top[3, :3] = 1.0
    bottom = np.zeros((4, 4))
    bottom[0, :3] = 1.0
    assert cluster_counts(np.stack([top, bottom])).tolist() == [1, 1]
    assert cluster_counts(np.zeros((0, 4, 4))).tolist() == []


def test_spatial_entropies_are_spatial_entropy_per_row() -> None:
    maps = np.random.default_rng(3).random((3, 5, 576))
    rows = spatial_entropies(maps)
    assert rows.shape == (3, 5)
    assert rows.tolist() == [[spatial_entropy(m) for m in layer] for layer in maps]
