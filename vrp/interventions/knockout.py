"""``knockout``: cut the answer's (or all text's) attention to the image tokens in windows of layers.

Usage::

    plan = plan_knockout(lake, base_run_id, layers="0-3,4-7", source="answer")
    run_intervention(plan, lake_root)

Each window is one condition: in its layers, the attention-mask entries from the answer position
(``answer``; the generated answer tokens too) or from every text position (``text``) to the image
tokens are removed (:func:`~vrp.interventions.hooks.knock_out_image_attention`; SDPA stays the
kernel), and the question is re-answered. Where accuracy and the truth margin fall is where image
information flows into the answer.

Rows: ``full`` (level 0) and one condition per window named by its layers (``0-3``, or ``5``),
level = the number of layers knocked out; the setting names the window and the source.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vrp.ingest.datasets import Sample
from vrp.ingest.models.base import Adapter, Encoded
from vrp.interventions.base import (
    Condition,
    Intervention,
    InterventionError,
    base_run,
    num_layers_of,
    parse_layer_spec,
)
from vrp.interventions.hooks import knock_out_image_attention
from vrp.lake import Lake

SOURCES = ("answer", "text")


def window_name(window: Sequence[int]) -> str:
    """``0-3`` for layers 0..3, ``5`` for a single layer."""
    return str(window[0]) if len(window) == 1 else f"{window[0]}-{window[-1]}"


@dataclass
class Knockout(Intervention):
    """Attention knockout from the answer (or all text) to the image, one condition per window."""

    kind = "knockout"
    windows: tuple[tuple[int, ...], ...] = ()
    source: str = "answer"

    def conditions(self) -> Sequence[Condition]:
        return [Condition("full", 0.0)] + [Condition(window_name(w), float(len(w)), w) for w in self.windows]

    @contextlib.contextmanager
    def apply(
        self, adapter: Adapter, enc: Encoded, condition: Condition, state: Any
    ) -> Iterator[dict[str, torch.Tensor]]:
        if condition.name == "full":
            yield enc.inputs
            return
        with knock_out_image_attention(adapter, enc, condition.payload, self.source):
            yield enc.inputs

    def rows(
        self,
        condition: Condition,
        batch: Sequence[Sample],
        answers: Sequence[dict[str, Any]],
        state: Any,
        reference: Sequence[dict[str, Any]] | None,
    ) -> list[dict[str, Any]]:
        window = [] if condition.name == "full" else list(condition.payload)
        setting = self.setting if condition.name == "full" else f"layers={condition.name},from={self.source}"
        detail = json.dumps({"layers": window, "from": self.source})
        return [
            {
                "sample_id": sample.sample_id,
                "kind": self.kind,
                "setting": setting,
                "condition": condition.name,
                "level": condition.level,
                "detail": detail,
                **answer,
            }
            for sample, answer in zip(batch, answers, strict=True)
        ]


def plan_knockout(lake: Lake, base_run_id: str, *, layers: str = "all", source: str = "answer") -> Knockout:
    """Check what knockout needs: the base run and windows of layers within its model's depth."""
    if source not in SOURCES:
        raise InterventionError(f"--from must be answer or text, got {source!r}")
    base = base_run(lake, base_run_id)
    windows = parse_layer_spec(layers, num_layers_of(lake, base_run_id))
    names = [window_name(w) for w in windows]
    if len(set(names)) != len(names):
        raise InterventionError(f"--layers {layers!r} names a window twice")
    return Knockout(
        base=base,
        setting=f"layers={layers},from={source}",
        seed=0,
        params={"windows": [list(w) for w in windows], "from": source},
        windows=tuple(windows),
        source=source,
    )
