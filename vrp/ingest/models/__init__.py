"""VLM family adapters: one interface over every registered family (see ``base.py`` and ``registry.py``)."""

from __future__ import annotations

from vrp.tasks.yesno import answer_token_ids

from .base import Adapter, Encoded, FamilySpec
from .family import Family
from .loading import REGISTRY, load_adapter
from .registry import families

FAMILIES: dict[str, FamilySpec] = {fam.name: fam.spec for fam in families()}

__all__ = [
    "FAMILIES",
    "REGISTRY",
    "Adapter",
    "Encoded",
    "Family",
    "FamilySpec",
    "answer_token_ids",
    "families",
    "load_adapter",
]
