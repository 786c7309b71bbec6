"""Tiny, randomly initialised checkpoints of each family, built offline from the real config classes.

``build_tiny(family, out_dir)`` writes a complete checkpoint (config, safetensors weights, word-level
tokenizer, processor with its image processor and, for Qwen2-VL, chat template) with
``save_pretrained``; ``load_adapter(str(out_dir))`` then loads it through the very path a user's
checkpoint takes. Tests use the defaults; the toy-zoo trainer passes larger sizes (e.g.
``hidden_size=128, num_layers=4, image_size=80, patch_size=8`` for a 10x10 grid).

The tokenizer is word-level (``tokenizers`` ``WordLevel``) over a fixed vocabulary: special tokens,
the prompt scaffolding of each family, every casing of yes/no, the shapes-POPE words (colours, shapes,
question words) and a caption vocabulary, plus any ``vocab_words``. Newlines are kept as a token so the
answer position sits where it does in the real tokenizers.

What differs per family (special tokens, default sizes, the config and processor classes) is the
family's ``TinyRecipe``, in its own module; this module holds what every family shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from .registry import tiny_recipe, tiny_variants

__all__ = [
    "BASE_WORDS",
    "build_tiny",
    "require_patch_multiple",
    "text_kwargs",
    "tiny_tokenizer",
    "tiny_vocabulary",
]

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
BASE_WORDS: tuple[str, ...] = (
    "yes",
    "no",
    "is",
    "there",
    "a",
    "an",
    "in",
    "the",
    "image",
    "picture",
    "?",
    ".",
    ",",
    ":",
    "!",
    "what",
    "which",
    "objects",
    "object",
    "are",
    "and",
    "of",
    "on",
    "with",
    "one",
    "two",
    "three",
    "four",
    "shape",
    "shapes",
    "colour",
    "color",
    "answer",
    "en",
    "single",
    "word",
    "or",
    "phrase",
    "describe",
    "this",
    "it",
    "not",
    "i",
    "see",
    "nothing",
    "empty",
    "background",
    "left",
    "right",
    "top",
    "bottom",
    "big",
    "small",
    "large",
    "user",
    "assistant",
    "system",
    "you",
    "helpful",
    *COLOURS,
    *SHAPES,
)


def tiny_vocabulary(family: str, vocab_words: Sequence[str] | None = None) -> list[str]:
    """Special tokens first (stable ids), then scaffolding and content words in lower and capital case."""
    recipe = tiny_recipe(family)
    specials = recipe.specials
    words = ["\n", "USER", "ASSISTANT", "YES", "NO"]
    for word in (*BASE_WORDS, *(vocab_words or ())):
        words.extend((word, word.capitalize()))
    words.extend(recipe.words)
    seen: dict[str, None] = dict.fromkeys(specials)
    for word in words:
        seen.setdefault(word, None)
    return list(seen)


def tiny_tokenizer(family: str, vocab_words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """The word-level tokenizer of a tiny ``family`` checkpoint (also used to test real-size geometry)."""
    recipe = tiny_recipe(family)
    roles = recipe.roles
    vocab = {token: i for i, token in enumerate(tiny_vocabulary(family, vocab_words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=roles["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    kwargs: dict[str, Any] = dict(roles)
    others = [
        t for t in recipe.specials if t not in roles.values() and t not in recipe.named_specials.values()
    ]
    if recipe.named_specials:
        kwargs["extra_special_tokens"] = dict(recipe.named_specials)
    else:
        kwargs["additional_special_tokens"] = others
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)
    if recipe.named_specials and others:  # special tokens without a name (Gemma 3's turn markers)
        tokenizer.add_tokens(others, special_tokens=True)
    if recipe.prepend_bos:
        tokenizer.add_bos_token = True
        bos = roles["bos_token"]
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return tokenizer


def text_kwargs(tokenizer: Any, opts: dict[str, Any]) -> dict[str, Any]:
    """Decoder config arguments every tiny builder shares: sizes from ``opts``, ids from the tokenizer."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": opts["hidden_size"],
        "intermediate_size": opts["intermediate_size"],
        "num_hidden_layers": opts["num_layers"],
        "num_attention_heads": opts["num_heads"],
        "num_key_value_heads": opts["num_kv_heads"],
        "max_position_embeddings": opts["max_position_embeddings"],
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def vision_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """Vision-tower config arguments the ViT-style tiny builders share (CLIP, SigLIP, InternViT)."""
    return {
        "hidden_size": opts["vision_hidden_size"],
        "intermediate_size": 2 * opts["vision_hidden_size"],
        "num_hidden_layers": opts["vision_layers"],
        "num_attention_heads": opts["vision_heads"],
        "image_size": opts["image_size"],
        "patch_size": opts["patch_size"],
    }


def require_patch_multiple(opts: dict[str, Any]) -> None:
    """Refuse an image size the fixed-resolution builders cannot tile with whole patches."""
    if opts["image_size"] % opts["patch_size"]:
        raise ValueError(
            f"image_size {opts['image_size']} must be a multiple of patch_size {opts['patch_size']}"
        )


def build_tiny(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    image_size: int | None = None,
    patch_size: int | None = None,
    vocab_words: Sequence[str] | None = None,
    **overrides: Any,
) -> Path:
    """Build and save a tiny random-weight checkpoint of ``family``; returns ``out_dir``.

    ``family`` is a variant the registry lists (``registry.tiny_variants()``: each family's name, and
    ``qwen2_5vl`` for Qwen2.5-VL, served by the Qwen2-VL adapter).

    Overrides: ``vision_hidden_size`` (32), ``vision_layers`` (2), ``vision_heads`` (2),
    ``intermediate_size`` (2 * hidden), ``image_mean`` / ``image_std`` (0.5),
    ``max_position_embeddings`` (512), and the options a family's recipe adds in its ``defaults``
    (Qwen2-VL: ``spatial_merge_size`` 2, ``min_pixels`` / ``max_pixels``).
    """
    if family not in tiny_variants():
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(tiny_variants())}")
    recipe = tiny_recipe(family)
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    opts: dict[str, Any] = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": 2 * hidden_size,
        "vision_hidden_size": 32,
        "vision_layers": 2,
        "vision_heads": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "max_position_embeddings": 512,
        **recipe.defaults,
    }
    if image_size is not None:
        opts["image_size"] = image_size
    if patch_size is not None:
        opts["patch_size"] = patch_size
    unknown = set(overrides) - set(opts)
    if unknown:
        raise TypeError(f"unknown build_tiny options: {', '.join(sorted(unknown))}")
    opts.update(overrides)

    tokenizer = tiny_tokenizer(family, vocab_words)
    torch.manual_seed(seed)
    model, processor = recipe.build(tokenizer, opts)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if recipe.after_save is not None:
        recipe.after_save(out, processor)
    return out
