"""The one list of VLM families; every other family list in VRP is derived from it.

Adding a family is one module holding its facts (ending in a ``Family`` value) plus one entry in
``FAMILY_LIST`` below (docs/CONTRIBUTING.md, "Adding a family"). Lookups:

- ``families()``: the registered families in order; ``family(name)``: one by its name.
- ``family_of_model_type(config.model_type)``: how a checkpoint finds its family (never from its name).
- ``checkpoint_names()``: registry short name -> hub id or toy folder, for ``--model``.
- ``tiny_variants()`` / ``tiny_recipe(variant)``: the tiny test checkpoints.
- ``toy_families()``: families with a toy in the zoo (``vrp toy train --family``).
"""

from __future__ import annotations

from pathlib import Path

from . import gemma3, idefics3, internvl, llava, llava_next, llava_onevision, paligemma, qwen2vl
from .family import Family, TinyRecipe

__all__ = [
    "FAMILY_LIST",
    "TOYS_DIR",
    "checkpoint_names",
    "families",
    "family",
    "family_of_model_type",
    "tiny_recipe",
    "tiny_variants",
    "toy_families",
    "toy_name",
]

FAMILY_LIST: tuple[Family, ...] = (
    llava.FAMILY,
    paligemma.FAMILY,
    qwen2vl.FAMILY,
    gemma3.FAMILY,
    llava_next.FAMILY,
    llava_onevision.FAMILY,
    idefics3.FAMILY,
    internvl.FAMILY,
)

TOYS_DIR = Path(__file__).resolve().parents[2] / "toys"


def families() -> tuple[Family, ...]:
    return FAMILY_LIST


def family(name: str) -> Family:
    """The family called ``name`` (``FamilySpec.family``)."""
    for fam in FAMILY_LIST:
        if fam.name == name:
            return fam
    raise ValueError(f"unknown family {name!r}; choose one of {', '.join(f.name for f in FAMILY_LIST)}")


def family_of_model_type(model_type: str) -> Family:
    """The family whose spec declares ``model_type`` (a checkpoint's ``config.model_type``)."""
    for fam in FAMILY_LIST:
        if model_type in fam.spec.model_types:
            return fam
    known = sorted(t for fam in FAMILY_LIST for t in fam.spec.model_types)
    raise ValueError(
        f"model_type {model_type!r} is not a supported VLM family (supported: {', '.join(known)})"
    )


def toy_name(name: str) -> str:
    """Registry name of a family's toy: ``toy-<family>``, a folder under ``vrp/toys``."""
    return f"toy-{name}"


def toy_families() -> tuple[str, ...]:
    return tuple(fam.name for fam in FAMILY_LIST if fam.toy is not None)


def checkpoint_names() -> dict[str, str]:
    """Every registry short name -> the hub id or toy folder it loads."""
    names: dict[str, str] = {}
    for fam in FAMILY_LIST:
        names.update(fam.names)
    for name in toy_families():
        names[toy_name(name)] = str(TOYS_DIR / toy_name(name))
    return names


def tiny_variants() -> tuple[str, ...]:
    """Names ``build_tiny`` accepts: each family's own name first, then its other variants."""
    return tuple(variant for fam in FAMILY_LIST for variant in fam.tiny)


def tiny_recipe(variant: str) -> TinyRecipe:
    for fam in FAMILY_LIST:
        if variant in fam.tiny:
            return fam.tiny[variant]
    raise ValueError(f"unknown family {variant!r}; choose one of {', '.join(tiny_variants())}")
