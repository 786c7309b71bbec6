"""Images the model sees as several patch grids: per-grid maps and one map stitched on the image.

What this module offers:

* :class:`Grid` / :class:`Layout` - where each grid of one image sits: its cells' places among the
  image tokens, the pixels it was cut from and the area of the original image it covers.
  :meth:`Layout.single` is the one-grid layout of LLaVA-1.5, PaliGemma and Qwen2-VL.
* :func:`grid_maps` - each grid's attention map (renormalised to sum to 1) and its raw mass.
* :func:`stitch_attention` / :func:`stitch_evidence` - one map on a lattice over the original
  image's area, from every grid (docs/ARCHITECTURE.md section 4.1b says how and why).
* :func:`cell_boxes` / :func:`locate_cell` - a grid cell's pixels, what patch masking greys.

Usage::

    layout = enc.layouts[b]
    maps, masses = grid_maps(raw, layout)  # raw: [..., n_image_tokens] attention probabilities
    stitched = stitch_attention(raw, layout)  # [..., R * C], sums to 1

Pure numpy on purpose: capture calls it on every layer at ingest time and analyses can call it
again on rows read from the lake. Boxes are ``(y0, x0, y1, x1)``, end-exclusive, in float pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vrp.metrics.attention import normalise_map

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Grid:
    """One patch grid of an image: a view the language model reads as ``rows x cols`` tokens.

    ``positions`` index the row's image tokens (``Encoded.image_pos[row]``), not the sequence, one
    per cell in row-major order; image tokens in no grid are row separators (LLaVA-NeXT's
    ``image_newline``). ``view`` names the pixel canvas the cells were cut from (which tensor is
    the family's fact). Cell (r, c) covers canvas pixels ``y_spans[r] x x_spans[c]`` and original
    image pixels ``image_y[r] x image_x[c]`` (each ``[n, 2]`` float start/end pairs; spans may leave
    gaps, like the pixels a SigLIP 384 px tile never reads, and may reach past the image where the
    processor padded). :meth:`uniform` builds the common case of equal cells over one box.
    """

    tile: int
    rows: int
    cols: int
    positions: np.ndarray
    view: int
    y_spans: np.ndarray
    x_spans: np.ndarray
    image_y: np.ndarray
    image_x: np.ndarray
    is_global: bool = False

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"grid {self.tile}: {self.rows}x{self.cols} has no cell")
        if len(self.positions) != self.rows * self.cols:
            raise ValueError(
                f"grid {self.tile}: {len(self.positions)} token positions for {self.rows}x{self.cols} cells"
            )
        for name, n in (
            ("y_spans", self.rows),
            ("x_spans", self.cols),
            ("image_y", self.rows),
            ("image_x", self.cols),
        ):
            spans = np.asarray(getattr(self, name))
            if spans.shape != (n, 2) or not (spans[:, 1] > spans[:, 0]).all():
                raise ValueError(f"grid {self.tile}: {name} must be {n} increasing (start, end) pairs")

    @classmethod
    def uniform(
        cls,
        tile: int,
        rows: int,
        cols: int,
        positions: np.ndarray,
        view: int,
        canvas_box: Box,
        image_box: Box,
        *,
        is_global: bool = False,
    ) -> Grid:
        """Equal cells over ``canvas_box`` and ``image_box`` (``(y0, x0, y1, x1)``)."""
        return cls(
            tile,
            rows,
            cols,
            np.asarray(positions),
            view,
            _spans(canvas_box[0], canvas_box[2], rows),
            _spans(canvas_box[1], canvas_box[3], cols),
            _spans(image_box[0], image_box[2], rows),
            _spans(image_box[1], image_box[3], cols),
            is_global,
        )

    @property
    def size(self) -> int:
        return self.rows * self.cols

    @property
    def image_box(self) -> Box:
        """The original-image area the grid spans: ``(y0, x0, y1, x1)``."""
        return (
            float(self.image_y[0, 0]),
            float(self.image_x[0, 0]),
            float(self.image_y[-1, 1]),
            float(self.image_x[-1, 1]),
        )


def _spans(start: float, stop: float, n: int) -> np.ndarray:
    edges = np.linspace(float(start), float(stop), n + 1)
    return np.stack([edges[:-1], edges[1:]], axis=1)


@dataclass(frozen=True)
class Layout:
    """Every grid of one image (global view first) and the lattice their stitched map lies on.

    ``stitched`` is ``(R, C)`` equal cells over the original image (``image_size`` = (H, W)). With
    one grid the stitched map *is* that grid's map, cell for cell, and no resampling happens.
    """

    grids: tuple[Grid, ...]
    image_size: tuple[int, int]
    stitched: tuple[int, int]
    n_tokens: int

    def __post_init__(self) -> None:
        if not self.grids:
            raise ValueError("a layout needs at least one grid")
        used = np.concatenate([np.asarray(g.positions) for g in self.grids])
        if used.size and (used.min() < 0 or used.max() >= self.n_tokens):
            raise ValueError(f"grid positions outside the {self.n_tokens} image tokens")
        if len(np.unique(used)) != used.size:
            raise ValueError("two grid cells claim the same image token")
        if [g.tile for g in self.grids] != list(range(len(self.grids))):
            raise ValueError("grids must be numbered 0, 1, ... in order (the global view first)")
        if len(self.grids) == 1 and self.stitched != (self.grids[0].rows, self.grids[0].cols):
            raise ValueError("a one-grid layout is stitched on its own grid")

    @classmethod
    def single(cls, rows: int, cols: int, image_size: tuple[int, int] | None = None) -> Layout:
        """The layout of a one-grid family: every image token is a cell, in row-major order."""
        size = image_size or (rows, cols)
        box = (0.0, 0.0, float(size[0]), float(size[1]))
        grid = Grid.uniform(0, rows, cols, np.arange(rows * cols), 0, box, box)
        return cls((grid,), (int(size[0]), int(size[1])), (rows, cols), rows * cols)

    @property
    def multi(self) -> bool:
        return len(self.grids) > 1

    @property
    def n_cells(self) -> int:
        """Cells over all grids: the range of the flat cell ids masking uses."""
        return sum(g.size for g in self.grids)

    @property
    def separators(self) -> int:
        """Image tokens that are in no grid (row separators / newline tokens)."""
        return self.n_tokens - self.n_cells


def grid_values(values: np.ndarray, layout: Layout) -> list[np.ndarray]:
    """Per grid, ``values[..., positions]``: ``[..., n_image_tokens]`` -> a list of ``[..., rows*cols]``."""
    values = np.asarray(values)
    if values.shape[-1] != layout.n_tokens:
        raise ValueError(f"{values.shape[-1]} values for a layout of {layout.n_tokens} image tokens")
    return [_select(values, np.asarray(g.positions)) for g in layout.grids]


def _select(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``values[..., positions]`` in C order; all tokens in order returns ``values`` itself.

    Fancy indexing on the last axis can hand back a differently strided array, and numpy then sums
    it in another order: a one-grid family's maps would move in the last bit. In C order, and
    untouched for one grid, they are bit-identical to the maps before grids existed.
    """
    if positions.size == values.shape[-1] and np.array_equal(positions, np.arange(positions.size)):
        return values
    return np.ascontiguousarray(values[..., positions])


def grid_maps(raw: np.ndarray, layout: Layout) -> tuple[list[np.ndarray], np.ndarray]:
    """Each grid's map renormalised to sum to 1, and its raw mass ``[..., n_grids]``.

    ``raw`` holds attention probabilities over the image tokens (before any renormalising), so a
    grid's mass is the share of the row that went to it, on the scale of ``image_mass``.
    """
    parts = grid_values(np.asarray(raw, dtype=np.float64), layout)
    masses = np.stack([p.sum(axis=-1) for p in parts], axis=-1)
    return [normalise_map(p) for p in parts], masses


def _overlap(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Overlap length of every dst span (rows) with every src span (cols): ``[n_dst, n_src]``."""
    lo = np.maximum(dst[:, None, 0], src[None, :, 0])
    hi = np.minimum(dst[:, None, 1], src[None, :, 1])
    return np.clip(hi - lo, 0.0, None)


def _lattice(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = layout.stitched
    height, width = layout.image_size
    return _spans(0.0, height, rows), _spans(0.0, width, cols)


def spread_weights(grid: Grid, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Separable weights ``(Wy [R, rows], Wx [C, cols])``: how a grid cell's box splits over the lattice.

    A grid cell (i, j) gives lattice cell (r, c) the fraction ``Wy[r, i] * Wx[c, j]`` of its value:
    the overlap of their boxes over the grid cell's area, so a cell wholly inside the image hands
    out all of it and one lying in padding outside the image hands out less.
    """
    lat_y, lat_x = _lattice(layout)
    src_y, src_x = np.asarray(grid.image_y, float), np.asarray(grid.image_x, float)
    wy = _overlap(src_y, lat_y) / np.diff(src_y, axis=1).T
    wx = _overlap(src_x, lat_x) / np.diff(src_x, axis=1).T
    return wy, wx


def _on_lattice(values: np.ndarray, grid: Grid, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    cells = values.reshape(*values.shape[:-1], grid.rows, grid.cols)
    out = np.einsum("ri,...ij,cj->...rc", wy, cells, wx)
    return out.reshape(*values.shape[:-1], wy.shape[0] * wx.shape[0])


def stitch_attention(raw: np.ndarray, layout: Layout) -> np.ndarray:
    """One attention map on the lattice over the original image: ``[..., n_tokens]`` -> ``[..., R*C]``.

    Every grid, the global view included, hands each cell's raw mass to the lattice cells its
    image box overlaps, in proportion to the overlap (mass-preserving), and the sum is
    renormalised. Attention is a probability mass: the answer reaches a region of the image through
    the global view's token for it or through a tile's, so the region's share is the sum of both.
    Row separators carry no place and are left out. One grid: that grid's map, unchanged.
    """
    raw = np.asarray(raw, dtype=np.float64)
    parts = grid_values(raw, layout)
    if not layout.multi:
        return normalise_map(parts[0])
    total = 0.0
    for grid, part in zip(layout.grids, parts, strict=True):
        wy, wx = spread_weights(grid, layout)
        total = total + _on_lattice(part, grid, wy, wx)
    return normalise_map(total)


def stitch_evidence(values: np.ndarray, layout: Layout) -> np.ndarray:
    """One evidence map on the lattice over the original image: ``[..., n_tokens]`` -> ``[..., R*C]``.

    Evidence is a logit difference per position, not a mass, so views do not add: a lattice cell
    gets the area-weighted mean of the finest views covering it (every grid but the global view),
    and the global view only where no finer grid reaches (and everywhere when it is the only grid).
    """
    values = np.asarray(values, dtype=np.float64)
    parts = grid_values(values, layout)
    if not layout.multi:
        return parts[0]
    lat_y, lat_x = _lattice(layout)

    def mean_of(grids: list[tuple[Grid, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        num, den = 0.0, 0.0
        for grid, part in grids:
            uy = _overlap(np.asarray(grid.image_y, float), lat_y) / np.diff(lat_y, axis=1)
            ux = _overlap(np.asarray(grid.image_x, float), lat_x) / np.diff(lat_x, axis=1)
            num = num + _on_lattice(part, grid, uy, ux)
            den = den + _on_lattice(np.ones(grid.size), grid, uy, ux)
        return np.asarray(num), np.asarray(den)

    pairs = list(zip(layout.grids, parts, strict=True))
    fine_num, fine_den = mean_of([(g, p) for g, p in pairs if not g.is_global])
    coarse_num, coarse_den = mean_of([(g, p) for g, p in pairs if g.is_global] or pairs)
    with np.errstate(invalid="ignore", divide="ignore"):
        fine = fine_num / fine_den
        coarse = coarse_num / coarse_den
    out = np.where(fine_den > 1e-12, fine, np.where(coarse_den > 1e-12, coarse, 0.0))
    return out


def cell_boxes(grid: Grid) -> np.ndarray:
    """``[rows*cols, 4]`` integer pixel boxes ``(y0, x0, y1, x1)`` of the cells in the grid's canvas.

    Span ends are rounded to whole pixels (half up), so cells that share an edge share the rounded
    edge: no pixel belongs to two cells and none between two touching cells is left out, also when
    a grid was resampled and its cells are not whole pixels wide (LLaVA-OneVision).
    """
    ys = np.floor(np.asarray(grid.y_spans, float) + 0.5).astype(int)
    xs = np.floor(np.asarray(grid.x_spans, float) + 0.5).astype(int)
    r, c = np.divmod(np.arange(grid.size), grid.cols)
    return np.stack([ys[r, 0], xs[c, 0], ys[r, 1], xs[c, 1]], axis=1)


def locate_cell(layout: Layout, flat: int) -> tuple[int, int]:
    """(grid index, row-major cell) of a flat cell id: cells numbered over the grids in tile order."""
    if not 0 <= flat < layout.n_cells:
        raise IndexError(f"cell {flat} outside the {layout.n_cells} cells of this image's grids")
    for index, grid in enumerate(layout.grids):
        if flat < grid.size:
            return index, flat
        flat -= grid.size
    raise AssertionError("unreachable: flat was range-checked")
