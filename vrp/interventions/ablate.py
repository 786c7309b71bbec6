"""``ablate``: zero or mean-replace the top-k L1 probe neurons of one layer's MLP output.

What this module offers:

* :class:`Edit` and :class:`CoordinateEdits` - conditions that overwrite chosen coordinates of a
  layer's MLP output at every position (through :class:`~vrp.interventions.hooks.EditOutput`);
  shared with ``destroy``.
* :func:`plan_ablate` -> :class:`Ablate`: reads the L1 probe's ranking (and, for ``mode="mean"``,
  the base run's stored MLP outputs).

Usage::

    plan = plan_ablate(lake, base_run_id, layer=-1, top_k=5, mode="zero", seed=1)
    run_intervention(plan, lake_root)

Rows: ``full`` (no edit, level 0), ``probe`` (the top-k) and with the random control ``random``
(k other coordinates drawn with the seed); level = k; ``detail`` lists the neurons and values.
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
from vrp.ingest.models.base import Adapter, Encoded, resolve_layer
from vrp.interventions.base import (
    NEURON_SITE,
    Condition,
    Intervention,
    InterventionError,
    base_run,
    hidden_size,
    num_layers_of,
    probe_order,
)
from vrp.interventions.hooks import EditOutput
from vrp.lake import Lake


@dataclass(frozen=True)
class Edit:
    """One coordinate-edit condition: which coordinates, replaced by what."""

    condition: str
    level: float
    coords: tuple[int, ...]
    values: tuple[float, ...] | None = None  # None = zero
    seed: int | None = None


@dataclass
class CoordinateEdits(Intervention):
    """Conditions that each overwrite some coordinates of one layer's MLP output at every position."""

    layer: int = 0
    edits: tuple[Edit, ...] = ()

    def conditions(self) -> Sequence[Condition]:
        return [Condition(e.condition, e.level, e) for e in self.edits]

    @contextlib.contextmanager
    def apply(
        self, adapter: Adapter, enc: Encoded, condition: Condition, state: Any
    ) -> Iterator[dict[str, torch.Tensor]]:
        edit: Edit = condition.payload
        with EditOutput(adapter.mlp_out(self.layer), edit.coords, edit.values):
            yield enc.inputs

    def detail(self, edit: Edit) -> dict[str, Any]:
        raise NotImplementedError

    def rows(
        self,
        condition: Condition,
        batch: Sequence[Sample],
        answers: Sequence[dict[str, Any]],
        state: Any,
        reference: Sequence[dict[str, Any]] | None,
    ) -> list[dict[str, Any]]:
        edit: Edit = condition.payload
        detail = json.dumps(self.detail(edit))
        return [
            {
                "sample_id": sample.sample_id,
                "kind": self.kind,
                "setting": self.setting,
                "condition": edit.condition,
                "level": edit.level,
                "detail": detail,
                "seed": edit.seed,
                **answer,
            }
            for sample, answer in zip(batch, answers, strict=True)
        ]


@dataclass
class Ablate(CoordinateEdits):
    """Probe-neuron ablation (zero or mean) with an optional random-k control."""

    kind = "ablate"

    def detail(self, edit: Edit) -> dict[str, Any]:
        return {"neurons": list(edit.coords), "values": list(edit.values) if edit.values else None}


def _mean_mlp_out(lake: Lake, run_id: str, layer: int, coords: Sequence[int]) -> tuple[float, ...]:
    """Mean of each coordinate over the base run's stored MLP outputs at the answer position."""
    from vrp.lake import to_matrix

    table = lake.arrow(
        "hidden", filter={"run_id": run_id, "site": NEURON_SITE, "layer": layer}, columns=["h"]
    )
    if table.num_rows == 0:
        raise InterventionError(
            f"run {run_id} did not store layer {layer}'s MLP output (hidden, site {NEURON_SITE}), which "
            "--mode mean averages; use --mode zero or re-ingest with --layers including it"
        )
    matrix = to_matrix(table.column("h")).astype(np.float64)
    return tuple(float(v) for v in matrix[:, list(coords)].mean(axis=0))


def plan_ablate(
    lake: Lake,
    base_run_id: str,
    *,
    layer: int,
    top_k: int = 5,
    mode: str = "zero",
    control: str | None = "random",
    seed: int = 0,
) -> Ablate:
    """Check and read what neuron ablation needs: the L1 probe's top-k neurons of ``layer``.

    Conditions: ``full`` (no edit, the paired reference), ``probe`` (the top-k), and with
    ``control="random"`` ``random`` (k coordinates drawn with ``seed`` among those not in the top-k).
    """
    if mode not in ("zero", "mean"):
        raise InterventionError(f"--mode must be zero or mean, got {mode!r}")
    if control not in (None, "none", "random"):
        raise InterventionError(f"--control must be random or none, got {control!r}")
    if top_k < 1:
        raise InterventionError(f"--top-k must be at least 1, got {top_k}")
    base = base_run(lake, base_run_id)
    index = resolve_layer(layer, num_layers_of(lake, base_run_id))
    hidden = hidden_size(base)
    order = probe_order(lake, base_run_id, index, "l1")
    if len(order) < top_k:
        raise InterventionError(
            f"the L1 probe of layer {index} ranked only {len(order)} neurons, fewer than --top-k {top_k}"
        )
    top = tuple(sorted(order[:top_k]))
    rest = np.setdiff1d(np.arange(hidden), np.asarray(top))
    edits = [Edit("full", 0.0, ())]
    chosen = [("probe", top, None)]
    if control == "random":
        rng = np.random.default_rng(seed)
        chosen.append(
            ("random", tuple(sorted(int(c) for c in rng.choice(rest, size=top_k, replace=False))), seed)
        )
    for condition, coords, used_seed in chosen:
        values = _mean_mlp_out(lake, base_run_id, index, coords) if mode == "mean" else None
        edits.append(Edit(condition, float(top_k), coords, values, used_seed))
    return Ablate(
        base=base,
        setting=f"layer={index},k={top_k},mode={mode},seed={seed}",
        seed=seed,
        params={"edits": [[e.condition, list(e.coords), e.values] for e in edits]},
        layer=index,
        edits=tuple(edits),
    )
