"""Causal interventions on a base run, one module per kind behind one protocol.

Kinds (each a run of its own whose rows go to ``interventions``):

* ``mask`` (:mod:`vrp.interventions.mask`) - grey out the most / least attended or random patches;
* ``ablate`` (:mod:`vrp.interventions.ablate`) - zero or mean-replace the top-k probe neurons;
* ``destroy`` (:mod:`vrp.interventions.destroy`) - zero a growing share of a layer's MLP output;
* ``patch`` (:mod:`vrp.interventions.patch`) - copy a rightly answered donor's activations into a
  wrongly answered recipient at one site, per layer, and measure the restoration;
* ``knockout`` (:mod:`vrp.interventions.knockout`) - cut the answer's (or all text's) attention to
  the image tokens in windows of layers.

The protocol (:class:`~vrp.interventions.base.Intervention`) and the runner
(:func:`~vrp.interventions.base.run_intervention`) are in :mod:`vrp.interventions.base`; answering
and scoring in :mod:`vrp.interventions.scoring`; the hooks in :mod:`vrp.interventions.hooks`.

Usage::

    from vrp.interventions import plan_patch, run_intervention
    plan = plan_patch(lake, base_run_id, site="resid", layers="all", positions="answer")
    run_intervention(plan, lake_root)
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so `vrp --help` (which lists `vrp intervene`) does not import torch.
_EXPORTS = {
    "Ablate": "ablate",
    "plan_ablate": "ablate",
    "Destroy": "destroy",
    "plan_destroy": "destroy",
    "Knockout": "knockout",
    "plan_knockout": "knockout",
    "Mask": "mask",
    "plan_mask": "mask",
    "Patch": "patch",
    "plan_patch": "patch",
    "Intervention": "base",
    "InterventionError": "base",
    "InterventionSummary": "base",
    "run_intervention": "base",
}

#: the kinds, each a module of this package holding its class and its plan function
KINDS: tuple[str, ...] = ("mask", "ablate", "destroy", "patch", "knockout")

__all__ = ["KINDS", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vrp.interventions' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vrp.interventions.{_EXPORTS[name]}"), name)
