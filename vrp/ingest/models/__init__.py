"""VLM family adapters: one interface over LLaVA-1.5, PaliGemma and Qwen2-VL (see ``base.py``)."""

from __future__ import annotations

from vrp.tasks.yesno import answer_token_ids

from .base import Adapter, Encoded, FamilySpec
from .llava import LLAVA
from .loading import REGISTRY, load_adapter
from .paligemma import PALIGEMMA
from .qwen2vl import QWEN2VL

FAMILIES: dict[str, FamilySpec] = {spec.family: spec for spec in (LLAVA, PALIGEMMA, QWEN2VL)}

__all__ = ["FAMILIES", "REGISTRY", "Adapter", "Encoded", "FamilySpec", "answer_token_ids", "load_adapter"]
