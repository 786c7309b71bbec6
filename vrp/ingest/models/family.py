"""What one VLM family is, as one record: its adapter, its public names, its tiny test checkpoints, its toy.

A family module (``llava.py``, ``paligemma.py``, ``qwen2vl.py``) ends with one ``Family`` value, and
``registry.py`` lists those values once; every other list of families in the package (``--family``
choices, the toy trainer, the loader's model types, the tests' parametrisations) is derived from that
list (docs/CONTRIBUTING.md, "Adding a family").

- ``adapter``: the ``Adapter`` subclass; its ``spec`` (``FamilySpec``) holds the declarative facts the
  engine reads, and its overrides hold the behaviour that differs (prompt, geometry, pixel masking,
  processor loading).
- ``names``: short registry names of public checkpoints (``llava-1.5-7b`` -> ``llava-hf/llava-1.5-7b-hf``).
- ``tiny``: how the tests build tiny random-weight checkpoints of it offline with its real classes, by
  variant name (Qwen2-VL's module also builds Qwen2.5-VL). The first variant is named after the family.
- ``toy``: the toy-zoo trainer's settings, or ``None`` when the family has no toy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast
    from transformers.processing_utils import ProcessorMixin

    from .base import Adapter, FamilySpec

__all__ = ["Family", "TinyRecipe", "ToyRecipe"]

TinyBuilder = Callable[
    ["PreTrainedTokenizerFast", dict[str, Any]], tuple["PreTrainedModel", "ProcessorMixin"]
]


@dataclass(frozen=True)
class TinyRecipe:
    """A tiny checkpoint of one variant: word-level tokenizer facts, default sizes and the builder.

    ``build(tokenizer, opts)`` returns the random-init model and its processor from the real config
    and processor classes; ``opts`` holds ``build_tiny``'s sizes over ``defaults``. ``after_save``
    rewrites saved files where the stock processor class must be named (Qwen2-VL).
    """

    specials: tuple[str, ...]
    roles: dict[str, str]
    build: TinyBuilder
    defaults: dict[str, int]
    # tokenizer attributes that name a special token (LLaVA's processor reads ``tokenizer.image_token``)
    named_specials: dict[str, str] = field(default_factory=dict)
    # whether the tokenizer prepends ``bos_token`` itself (Llama's and Gemma's tokenizers do)
    prepend_bos: bool = False
    # words of the family's prompt scaffolding, added to the vocabulary after the shared words
    words: tuple[str, ...] = ()
    after_save: Callable[[Path, Any], None] | None = None


@dataclass(frozen=True)
class ToyRecipe:
    """Toy-zoo facts: ``build_tiny`` options the trainer adds for this family's toy."""

    build_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """Everything VRP knows about one family, registered once in ``registry.py``."""

    adapter: type[Adapter]
    names: dict[str, str]
    tiny: dict[str, TinyRecipe]
    toy: ToyRecipe | None = None

    @property
    def spec(self) -> FamilySpec:
        return self.adapter.spec

    @property
    def name(self) -> str:
        return self.adapter.spec.family
