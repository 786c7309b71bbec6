"""``destroy``: zero a growing share of one layer's MLP output coordinates (the destruction sweep).

Usage::

    plan = plan_destroy(lake, base_run_id, layer="peak", fractions=[0.05, 0.5], order="probe")
    run_intervention(plan, lake_root)

Each fraction f zeroes the first ``round(f * hidden)`` coordinates of one order: the L2 probe's
|coefficient| ranking over all coordinates (``probe``) or a permutation drawn with the seed
(``random``); so a larger fraction always contains a smaller one. Rows: ``full`` (level 0) and one
condition (the order's name) per fraction (level = the fraction); ``detail`` gives the count, the
order itself is in the run's config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vrp.ingest.models.base import resolve_layer
from vrp.interventions.ablate import CoordinateEdits, Edit
from vrp.interventions.base import (
    InterventionError,
    base_run,
    hidden_size,
    n_cells,
    num_layers_of,
    peak_layer,
    probe_order,
)
from vrp.lake import Lake


@dataclass
class Destroy(CoordinateEdits):
    """The destruction sweep over one layer's MLP output."""

    kind = "destroy"

    def detail(self, edit: Edit) -> dict[str, Any]:
        return {"n": len(edit.coords), "coords": "the first n of runs.config.order"}


def plan_destroy(
    lake: Lake,
    base_run_id: str,
    *,
    layer: int | str,
    fractions: Sequence[float] = (0.05, 0.1, 0.25, 0.5, 0.75),
    order: str = "probe",
    seed: int = 0,
) -> Destroy:
    """Check and read what the destruction sweep needs; ``layer="peak"`` takes the best probe layer."""
    if order not in ("probe", "random"):
        raise InterventionError(f"--order must be probe or random, got {order!r}")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad or not fractions:
        raise InterventionError(f"--fractions must lie in (0, 1], got {list(fractions) or '(none)'}")
    base = base_run(lake, base_run_id)
    n_layers = num_layers_of(lake, base_run_id)
    index = peak_layer(lake, base_run_id) if layer == "peak" else resolve_layer(int(layer), n_layers)
    hidden = hidden_size(base)
    if order == "probe":
        ranking = probe_order(lake, base_run_id, index, "l2")
        if len(ranking) < hidden:
            missing = np.setdiff1d(np.arange(hidden), np.asarray(ranking))
            ranking = ranking + [int(c) for c in missing]  # unranked coordinates come last, in index order
    else:
        ranking = [int(c) for c in np.random.default_rng(seed).permutation(hidden)]
    edits = [Edit("full", 0.0, ())]
    for fraction in sorted(set(fractions)):
        count = n_cells(fraction, hidden)
        edits.append(
            Edit(
                order,
                float(fraction),
                tuple(sorted(ranking[:count])),
                None,
                seed if order == "random" else None,
            )
        )
    return Destroy(
        base=base,
        setting=f"layer={index},order={order},seed={seed}",
        seed=seed,
        params={"fractions": sorted(set(fractions)), "order": ranking},
        layer=index,
        edits=tuple(edits),
    )
