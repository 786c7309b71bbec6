"""Multi-grid layouts: per-grid maps, the stitched map, cell pixels (vrp.metrics.grids).

The stitched map is checked against an independent computation: every grid painted onto a pixel
raster of the original image (each cell's mass spread evenly over its pixels), then summed per
lattice cell. The cell boxes are checked by counting how often each pixel is covered.
"""

from __future__ import annotations

import numpy as np
import pytest

from vrp.metrics.attention import cluster_count, spatial_entropy
from vrp.metrics.grids import (
    Grid,
    Layout,
    cell_boxes,
    grid_maps,
    locate_cell,
    stitch_attention,
    stitch_evidence,
)


def _two_grid_layout() -> Layout:
    """A 12x24 px image: a 2x4 global view over all of it, then one 6x12 high-res grid with a
    separator token after each of its rows (like LLaVA-NeXT's newline tokens)."""
    glob = Grid.uniform(0, 2, 4, np.arange(8), 0, (0, 0, 24, 24), (0, 0, 12, 24), is_global=True)
    positions = []
    token = 8
    for _ in range(6):
        positions.extend(range(token, token + 12))
        token += 13  # 12 cells then a separator
    tiles = Grid.uniform(1, 6, 12, np.asarray(positions), 1, (0, 0, 12, 24), (0, 0, 12, 24))
    return Layout((glob, tiles), (12, 24), (6, 12), token)


def _raster(values: np.ndarray, layout: Layout, *, mass: bool) -> np.ndarray:
    """Independent reference: paint each grid on the image's pixels, then pool per lattice cell."""
    height, width = layout.image_size
    rows, cols = layout.stitched
    if mass:
        canvas = np.zeros((height, width))
        for grid in layout.grids:
            y0, x0, y1, x1 = (int(v) for v in grid.image_box)
            ch, cw = (y1 - y0) // grid.rows, (x1 - x0) // grid.cols
            for cell, pos in enumerate(grid.positions):
                r, c = divmod(cell, grid.cols)
                canvas[y0 + r * ch : y0 + (r + 1) * ch, x0 + c * cw : x0 + (c + 1) * cw] += values[pos] / (
                    ch * cw
                )
        pooled = canvas.reshape(rows, height // rows, cols, width // cols).sum(axis=(1, 3))
        return (pooled / pooled.sum()).ravel()
    raise AssertionError


def test_single_grid_stitched_map_is_the_grid():
    layout = Layout.single(3, 4)
    raw = np.random.default_rng(0).random(12) * 0.1
    maps, masses = grid_maps(raw, layout)
    np.testing.assert_allclose(stitch_attention(raw, layout), raw / raw.sum())
    np.testing.assert_allclose(maps[0], raw / raw.sum())
    np.testing.assert_allclose(masses, [raw.sum()])
    np.testing.assert_allclose(stitch_evidence(raw, layout), raw)
    assert layout.separators == 0 and layout.n_cells == 12


def test_per_grid_maps_sum_to_one_and_masses_leave_out_separators():
    layout = _two_grid_layout()
    raw = np.random.default_rng(1).random((3, layout.n_tokens)) * 0.01  # 3 heads
    maps, masses = grid_maps(raw, layout)
    assert [m.shape for m in maps] == [(3, 8), (3, 72)]
    for m in maps:
        np.testing.assert_allclose(m.sum(-1), 1.0)
    separators = np.setdiff1d(np.arange(layout.n_tokens), np.concatenate([g.positions for g in layout.grids]))
    assert len(separators) == layout.separators == 6
    np.testing.assert_allclose(masses.sum(-1), raw.sum(-1) - raw[:, separators].sum(-1))
    # H_s and C_k per grid are the ordinary metrics on each grid's own map
    assert spatial_entropy(np.full(8, 1 / 8)) == pytest.approx(np.log(8), abs=1e-6)
    assert cluster_count(maps[1][0].reshape(6, 12)) >= 0


def test_stitched_attention_matches_a_pixel_raster():
    layout = _two_grid_layout()
    raw = np.random.default_rng(2).random(layout.n_tokens)
    stitched = stitch_attention(raw, layout)
    assert stitched.shape == (72,)
    np.testing.assert_allclose(stitched.sum(), 1.0)
    np.testing.assert_allclose(stitched, _raster(raw, layout, mass=True), atol=1e-12)


def test_stitched_attention_by_hand():
    """All mass on the global view's top-left cell: it covers the 3x3 top-left lattice cells evenly."""
    layout = _two_grid_layout()
    raw = np.zeros(layout.n_tokens)
    raw[0] = 0.5
    stitched = stitch_attention(raw, layout).reshape(6, 12)
    expected = np.zeros((6, 12))
    expected[:3, :3] = 1 / 9
    np.testing.assert_allclose(stitched, expected, atol=1e-12)


def test_mass_outside_the_image_is_dropped_before_renormalising():
    """A global view padded beyond the image: its padding row hands nothing to the lattice."""
    glob = Grid.uniform(0, 2, 2, np.arange(4), 0, (0, 0, 8, 8), (-4, 0, 12, 8), is_global=True)
    tile = Grid.uniform(1, 2, 2, np.arange(4, 8), 1, (0, 0, 8, 8), (0, 0, 8, 8))
    layout = Layout((glob, tile), (8, 8), (2, 2), 8)
    raw = np.zeros(8)
    raw[0] = 1.0  # global cell (0, 0): y in [-4, 4), half of it above the image
    raw[7] = 0.5  # tile cell (1, 1)
    stitched = stitch_attention(raw, layout).reshape(2, 2)
    # the global cell gives 0.5 (its in-image half) to lattice (0, 0); the tile gives 0.5 to (1, 1)
    np.testing.assert_allclose(stitched, [[0.5, 0.0], [0.0, 0.5]], atol=1e-12)


def test_stitched_evidence_takes_the_finest_view_and_the_global_view_only_where_nothing_finer_is():
    glob = Grid.uniform(0, 1, 2, np.arange(2), 0, (0, 0, 4, 4), (0, 0, 4, 8), is_global=True)
    # tiles cover only the left half of the image
    tile = Grid.uniform(1, 2, 2, np.arange(2, 6), 1, (0, 0, 4, 4), (0, 0, 4, 4))
    layout = Layout((glob, tile), (4, 8), (2, 4), 6)
    values = np.asarray([10.0, 20.0, 1.0, 2.0, 3.0, 4.0])
    stitched = stitch_evidence(values, layout).reshape(2, 4)
    np.testing.assert_allclose(stitched, [[1.0, 2.0, 20.0, 20.0], [3.0, 4.0, 20.0, 20.0]])


def test_stitched_evidence_is_an_area_weighted_mean():
    glob = Grid.uniform(0, 1, 1, np.arange(1), 0, (0, 0, 2, 2), (0, 0, 2, 2), is_global=True)
    tile = Grid.uniform(1, 2, 2, np.arange(1, 5), 1, (0, 0, 2, 2), (0, 0, 2, 2))
    layout = Layout((glob, tile), (2, 2), (1, 1), 5)
    values = np.asarray([100.0, 1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(stitch_evidence(values, layout), [3.0])  # (1+2+3+6)/4, global ignored


@pytest.mark.parametrize(("box", "rows", "cols"), [((0, 0, 14, 28), 1, 2), ((3.4, 0, 19.6, 10), 5, 3)])
def test_cell_boxes_partition_the_canvas_box(box, rows, cols):
    grid = Grid.uniform(0, rows, cols, np.arange(rows * cols), 0, box, box)
    boxes = cell_boxes(grid)
    cover = np.zeros((40, 40), dtype=int)
    for y0, x0, y1, x1 in boxes:
        assert y1 > y0 and x1 > x0
        cover[y0:y1, x0:x1] += 1
    top, left = int(np.floor(box[0] + 0.5)), int(np.floor(box[1] + 0.5))
    bottom, right = int(np.floor(box[2] + 0.5)), int(np.floor(box[3] + 0.5))
    assert cover.max() == 1
    assert cover[top:bottom, left:right].min() == 1
    assert cover.sum() == (bottom - top) * (right - left)


def test_cell_boxes_of_whole_pixel_cells():
    grid = Grid.uniform(0, 2, 3, np.arange(6), 0, (14, 0, 42, 42), (0, 0, 1, 1))
    assert cell_boxes(grid).tolist()[4] == [28, 14, 42, 28]


def test_locate_cell_counts_over_grids_in_tile_order():
    layout = _two_grid_layout()
    assert locate_cell(layout, 0) == (0, 0)
    assert locate_cell(layout, 7) == (0, 7)
    assert locate_cell(layout, 8) == (1, 0)
    assert locate_cell(layout, 79) == (1, 71)
    with pytest.raises(IndexError, match="80 cells"):
        locate_cell(layout, 80)


def test_layout_refuses_inconsistent_grids():
    box = (0, 0, 2, 2)
    with pytest.raises(ValueError, match="same image token"):
        Layout(
            (
                Grid.uniform(0, 1, 2, np.asarray([0, 1]), 0, box, box),
                Grid.uniform(1, 1, 1, np.asarray([1]), 0, box, box),
            ),
            (2, 2),
            (1, 2),
            2,
        )
    with pytest.raises(ValueError, match="outside the 2 image tokens"):
        Layout((Grid.uniform(0, 1, 2, np.asarray([0, 2]), 0, box, box),), (2, 2), (1, 2), 2)
    with pytest.raises(ValueError, match="positions for"):
        Grid.uniform(0, 2, 2, np.arange(3), 0, box, box)
    with pytest.raises(ValueError, match="numbered"):
        Layout((Grid.uniform(1, 1, 1, np.asarray([0]), 0, box, box),), (2, 2), (1, 1), 1)


def test_spans_with_gaps_leave_the_unread_pixels_alone_and_keep_the_mass():
    """Like a SigLIP 384 px tile read as 27 x 14 px: the last pixels belong to no cell."""
    spans = np.asarray([[0.0, 2.0], [2.0, 4.0]])
    grid = Grid(0, 2, 2, np.arange(4), 0, spans, spans, spans * 5 / 5, spans * 5 / 5)  # canvas 5 px, 1 unread
    boxes = cell_boxes(grid)
    cover = np.zeros((5, 5), dtype=int)
    for y0, x0, y1, x1 in boxes:
        cover[y0:y1, x0:x1] += 1
    assert cover[:4, :4].min() == 1 and cover[4].sum() == 0 and cover[:, 4].sum() == 0
    glob = Grid.uniform(0, 1, 1, np.arange(1), 0, (0, 0, 5, 5), (0, 0, 4, 4), is_global=True)
    tiles = Grid(1, 2, 2, np.arange(1, 5), 1, spans, spans, spans, spans)
    layout = Layout((glob, tiles), (4, 4), (2, 2), 5)
    raw = np.asarray([0.4, 0.1, 0.2, 0.3, 0.0])
    np.testing.assert_allclose(stitch_attention(raw, layout), [0.2, 0.3, 0.4, 0.1])
