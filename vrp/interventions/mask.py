"""``mask``: grey out the most / least attended or random patches and re-answer.

What this module offers:

* :func:`rank_cells` - the top / bottom / a seeded random share of a stored attention map's cells.
* :func:`grey_value` / :func:`mask_cells` - grey out (RGB 128) whole patch-grid cells directly in
  the *preprocessed* ``pixel_values``, in the processor's own normalisation; where a cell's pixels
  sit in that tensor is the family adapter's ``mask_pixels``. Masking after the resize is exact: a
  grey box drawn on the original image would bleed into neighbouring patches through interpolation.
* :func:`plan_mask` -> :class:`Mask`: reads the base run's stored maps of one layer.

Usage::

    plan = plan_mask(lake, base_run_id, ratio=0.3, layer=-1, seed=1)
    run_intervention(plan, lake_root)

Rows: conditions ``full`` (level 0), ``high``, ``low``, ``random`` (level = the ratio); ``detail``
lists the masked patches; ``seed`` is set on ``random`` rows. Per sample, ``high`` minus ``full``
of ``token_entropy`` and ``truth_margin`` is the masking detector (query ``mask_detector``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vrp.ingest.datasets import Sample
from vrp.ingest.generate import sample_seed
from vrp.ingest.models.base import Adapter, Encoded, resolve_layer
from vrp.interventions.base import (
    Condition,
    Intervention,
    InterventionError,
    base_run,
    n_cells,
    num_layers_of,
)
from vrp.lake import Lake

MASK_CONDITIONS = ("full", "high", "low", "random")
GREY = 128


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


def mask_cells(
    adapter: Adapter, enc: Encoded, cells: Sequence[Sequence[int]], value: torch.Tensor | None = None
) -> torch.Tensor:
    """A copy of ``enc.inputs["pixel_values"]`` with every pixel of the given cells set to grey.

    ``cells[row]`` lists the grid cells (row-major, as in the lake's attention maps) of batch row
    ``row``. Where a cell's pixels sit is the family's fact (:meth:`Adapter.mask_pixels`): the
    cell's :meth:`Adapter.patch_box` in an image layout ``[B, C, H, W]``, or Qwen2-VL's flattened
    patch rows.
    """
    pixels = enc.inputs["pixel_values"].clone()
    grey = (grey_value(adapter.processor) if value is None else value).to(pixels.device, pixels.dtype)
    if len(cells) != len(enc.grids):
        raise ValueError(f"{len(cells)} cell lists for a batch of {len(enc.grids)}")
    return adapter.mask_pixels(pixels, enc, cells, grey)


def _shapes(shapes: Sequence[tuple[int, int]]) -> str:
    return " + ".join(f"{h}x{w}" for h, w in shapes)


def cell_shares(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[tuple[tuple[int, int], ...], np.ndarray]]:
    """Per sample, (the grids' shapes, one value per cell to rank) from one layer's map rows.

    One grid: its map (``tile`` -1, or null in rows older than the column). Several grids (rows
    with ``tile`` >= 0, docs/ARCHITECTURE.md section 4.1b): every grid's cells in tile order, each
    map scaled by its grid's raw mass, so cells of different grids compare by the share of the
    answer's attention they received; the ranked ids are then the flat cell ids masking uses.
    """
    by_sample: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_sample.setdefault(row["sample_id"], []).append(row)
    out = {}
    for sample_id, sample_rows in by_sample.items():
        grids = sorted((r for r in sample_rows if r["tile"] is not None and r["tile"] >= 0), key=_tile)
        if grids:
            shapes = tuple((int(r["grid_h"]), int(r["grid_w"])) for r in grids)
            values = np.concatenate(
                [np.asarray(r["map"], dtype=np.float64) * float(r["mass"]) for r in grids]
            )
        else:
            (whole,) = sample_rows
            shapes = ((int(whole["grid_h"]), int(whole["grid_w"])),)
            values = np.asarray(whole["map"], dtype=np.float64)
        out[sample_id] = (shapes, values)
    return out


def _tile(row: dict[str, Any]) -> int:
    return int(row["tile"])


@dataclass(frozen=True)
class _MaskBatch:
    grey: torch.Tensor
    cells: dict[str, list[list[int]]]  # condition -> per row, the masked cells


@dataclass
class Mask(Intervention):
    """Patch masking ranked by one layer's stored answer-position attention map."""

    kind = "mask"
    layer: int = -1
    ratio: float = 0.3
    masks: tuple[str, ...] = MASK_CONDITIONS
    # sample -> (each grid's shape, one ranking value per cell over all grids; see cell_shares)
    maps: dict[str, tuple[tuple[tuple[int, int], ...], np.ndarray]] | None = None

    def select(self, samples: Sequence[Sample]) -> list[Sample]:
        missing = [s.sample_id for s in samples if s.sample_id not in (self.maps or {})]
        if missing:
            raise InterventionError(
                f"{len(missing)} samples of run {self.base_run_id} have no layer {self.layer} map"
            )
        return list(samples)

    def conditions(self) -> Sequence[Condition]:
        return [Condition(c, 0.0 if c == "full" else self.ratio) for c in self.masks]

    def prepare(self, adapter: Adapter, enc: Encoded, batch: Sequence[Sample]) -> _MaskBatch:
        """The grey value and, per condition, each row's cells (drawn once, used by apply and rows)."""
        cells = {condition.name: self._cells(enc, batch, condition.name) for condition in self.conditions()}
        return _MaskBatch(grey=grey_value(adapter.processor), cells=cells)

    def _cells(self, enc: Encoded, batch: Sequence[Sample], condition: str) -> list[list[int]]:
        chosen = []
        for b, sample in enumerate(batch):
            shapes, attention = self.maps[sample.sample_id]
            now = (
                tuple((g.rows, g.cols) for g in enc.layouts[b].grids)
                if enc.layouts and enc.layouts[b].multi
                else (tuple(enc.grids[b]),)
            )
            if shapes != now:
                raise InterventionError(
                    f"sample {sample.sample_id}: the stored maps are {_shapes(shapes)} but the "
                    f"processor now gives {_shapes(now)}; its settings changed"
                )
            count = 0 if condition == "full" else n_cells(self.ratio, attention.size)
            rng = np.random.default_rng(sample_seed(self.seed, sample.sample_id, 0))
            chosen.append(rank_cells(attention, condition, count, rng))
        return chosen

    @contextlib.contextmanager
    def apply(
        self, adapter: Adapter, enc: Encoded, condition: Condition, state: _MaskBatch
    ) -> Iterator[dict[str, torch.Tensor]]:
        chosen = state.cells[condition.name]
        inputs = dict(enc.inputs)
        if any(chosen):
            inputs["pixel_values"] = mask_cells(adapter, enc, chosen, state.grey)
        yield inputs

    def rows(
        self,
        condition: Condition,
        batch: Sequence[Sample],
        answers: Sequence[dict[str, Any]],
        state: _MaskBatch,
        reference: Sequence[dict[str, Any]] | None,
    ) -> list[dict[str, Any]]:
        return [
            {
                "sample_id": sample.sample_id,
                "kind": self.kind,
                "setting": self.setting,
                "condition": condition.name,
                "level": condition.level,
                "detail": json.dumps({"patches": cells}),
                "seed": self.seed if condition.name == "random" else None,
                **answer,
            }
            for sample, cells, answer in zip(batch, state.cells[condition.name], answers, strict=True)
        ]


def plan_mask(
    lake: Lake,
    base_run_id: str,
    *,
    ratio: float = 0.3,
    conditions: Sequence[str] = MASK_CONDITIONS,
    layer: int = -1,
    seed: int = 0,
) -> Mask:
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
        columns=["sample_id", "tile", "grid_h", "grid_w", "map", "mass"],
    )
    if table.num_rows == 0:
        stored = base["config"].get("capture", {}).get("layers")
        raise InterventionError(
            f"run {base_run_id} did not store the attention maps of layer {index} "
            f"(it stored layers {stored}); "
            "choose one of those with --layer, or re-ingest with --layers including it"
        )
    maps = cell_shares(table.to_pylist())
    ordered = tuple(c for c in MASK_CONDITIONS if c in conditions)
    return Mask(
        base=base,
        setting=f"ratio={ratio:g},layer={index},seed={seed}",
        seed=seed,
        params={"conditions": list(ordered), "ratio": ratio},
        layer=index,
        ratio=ratio,
        masks=ordered,
        maps=maps,
    )
