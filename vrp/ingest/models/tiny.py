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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BASE_WORDS",
    "FAMILY_DEFAULTS",
    "QWEN_CHAT_TEMPLATE",
    "build_tiny",
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

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# family -> (special tokens in id order, tokenizer role -> token)
_SPECIALS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "llava": (
        ("<unk>", "<s>", "</s>", "<pad>", "<image>"),
        {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
    ),
    "paligemma": (
        ("<pad>", "<eos>", "<bos>", "<unk>", "<image>"),
        {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    ),
    "qwen2vl": (
        (
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<unk>",
        ),
        {"unk_token": "<unk>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    ),
}

_SPECIALS["qwen2_5vl"] = _SPECIALS["qwen2vl"]

FAMILY_DEFAULTS: dict[str, dict[str, int]] = {
    "llava": {"image_size": 32, "patch_size": 8},
    "paligemma": {"image_size": 32, "patch_size": 8},
    "qwen2vl": {"image_size": 32, "patch_size": 4},
    "qwen2_5vl": {"image_size": 32, "patch_size": 4},
}


def tiny_vocabulary(family: str, vocab_words: Sequence[str] | None = None) -> list[str]:
    """Special tokens first (stable ids), then scaffolding and content words in lower and capital case."""
    specials, _ = _SPECIALS[family]
    words = ["\n", "USER", "ASSISTANT", "YES", "NO"]
    for word in (*BASE_WORDS, *(vocab_words or ())):
        words.extend((word, word.capitalize()))
    seen: dict[str, None] = dict.fromkeys(specials)
    for word in words:
        seen.setdefault(word, None)
    return list(seen)


def tiny_tokenizer(family: str, vocab_words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """The word-level tokenizer of a tiny ``family`` checkpoint (also used to test real-size geometry)."""
    specials, roles = _SPECIALS[family]
    vocab = {token: i for i, token in enumerate(tiny_vocabulary(family, vocab_words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=roles["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    extra = [t for t in specials if t not in roles.values()]
    kwargs: dict[str, Any] = dict(roles)
    if family == "llava":
        kwargs["extra_special_tokens"] = {"image_token": "<image>"}
    else:
        kwargs["additional_special_tokens"] = extra
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)
    if family == "llava":
        tokenizer.add_bos_token = True
        from tokenizers.processors import TemplateProcessing

        bos_id = vocab["<s>"]
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    return tokenizer


def _text_rope(head_dim: int) -> dict[str, Any]:
    """Qwen2-VL M-RoPE sections summing to head_dim / 2, in the published 1 : 1.5 : 1.5 proportions."""
    half = head_dim // 2
    temporal = max(1, half // 4)
    height = (half - temporal) // 2
    return {
        "rope_type": "default",
        "rope_theta": 1_000_000.0,
        "mrope_section": [temporal, height, half - temporal - height],
    }


def _llava(tokenizer: Any, opts: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size, patch = opts["image_size"], opts["patch_size"]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=opts["image_mean"],
        image_std=opts["image_std"],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    vision = CLIPVisionConfig(
        hidden_size=opts["vision_hidden_size"],
        intermediate_size=2 * opts["vision_hidden_size"],
        num_hidden_layers=opts["vision_layers"],
        num_attention_heads=opts["vision_heads"],
        image_size=size,
        patch_size=patch,
        projection_dim=opts["vision_hidden_size"],
    )
    text = LlamaConfig(**_text_kwargs(tokenizer, opts))
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(size // patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config), processor


def _paligemma(tokenizer: Any, opts: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    size, patch = opts["image_size"], opts["patch_size"]
    image_processor = SiglipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=opts["image_mean"], image_std=opts["image_std"]
    )
    image_processor.image_seq_length = (size // patch) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vision = SiglipVisionConfig(
        hidden_size=opts["vision_hidden_size"],
        intermediate_size=2 * opts["vision_hidden_size"],
        num_hidden_layers=opts["vision_layers"],
        num_attention_heads=opts["vision_heads"],
        image_size=size,
        patch_size=patch,
        vision_use_head=False,
    )
    text_kwargs = _text_kwargs(processor.tokenizer, opts)
    text_kwargs["head_dim"] = opts["hidden_size"] // opts["num_heads"]
    text = GemmaConfig(**text_kwargs)
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        vocab_size=text.vocab_size,
        projection_dim=opts["hidden_size"],
        hidden_size=opts["hidden_size"],
    )
    return PaliGemmaForConditionalGeneration(config), processor


def _qwen2vl(tokenizer: Any, opts: dict[str, Any], *, v2_5: bool = False) -> tuple[Any, Any]:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .qwen2vl import ImageOnlyQwen2VLProcessor

    size, patch, merge = opts["image_size"], opts["patch_size"], opts["spatial_merge_size"]
    cell = patch * merge
    if size % cell:
        raise ValueError(f"image_size {size} must be a multiple of patch_size * spatial_merge_size = {cell}")
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=2,
        min_pixels=opts.get("min_pixels") or (2 * cell) ** 2,
        max_pixels=opts.get("max_pixels") or size * size,
        image_mean=opts["image_mean"],
        image_std=opts["image_std"],
    )
    processor = ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    text_kwargs = _text_kwargs(tokenizer, opts)
    text_kwargs["rope_parameters"] = _text_rope(opts["hidden_size"] // opts["num_heads"])
    text_kwargs["bos_token_id"] = None
    ids = tokenizer.convert_tokens_to_ids
    vision: dict[str, Any] = {
        "depth": opts["vision_layers"],
        "num_heads": opts["vision_heads"],
        "patch_size": patch,
        "spatial_merge_size": merge,
        "temporal_patch_size": 2,
    }
    if v2_5:
        # Qwen2.5-VL: windowed vision attention (window in pixels, a multiple of the merged cell) with
        # full attention in the last block; the merger projects to the LLM width via out_hidden_size.
        vision.update(
            hidden_size=opts["vision_hidden_size"],
            intermediate_size=2 * opts["vision_hidden_size"],
            out_hidden_size=opts["hidden_size"],
            window_size=2 * cell,
            fullatt_block_indexes=[opts["vision_layers"] - 1],
        )
    else:
        vision.update(embed_dim=opts["vision_hidden_size"], hidden_size=opts["hidden_size"], mlp_ratio=2)
    config_class, model_class = (
        (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)
        if v2_5
        else (Qwen2VLConfig, Qwen2VLForConditionalGeneration)
    )
    config = config_class(
        text_config=text_kwargs,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return model_class(config), processor


def _qwen2_5vl(tokenizer: Any, opts: dict[str, Any]) -> tuple[Any, Any]:
    return _qwen2vl(tokenizer, opts, v2_5=True)


def _text_kwargs(tokenizer: Any, opts: dict[str, Any]) -> dict[str, Any]:
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


_QWEN_PROCESSORS = {"qwen2vl": "Qwen2VLProcessor", "qwen2_5vl": "Qwen2_5_VLProcessor"}

_BUILDERS = {"llava": _llava, "paligemma": _paligemma, "qwen2vl": _qwen2vl, "qwen2_5vl": _qwen2_5vl}


def _fix_qwen_processor_files(out: Path, processor: Any, processor_class: str) -> None:
    """Make the saved files name the stock Qwen processor class and carry a video-processor config.

    The checkpoint is then what a hub checkpoint is: with torchvision ``AutoProcessor`` builds the
    full processor, without it ``load_adapter`` builds the image-only one.
    """
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = out / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["processor_class"] = processor_class
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    ip = processor.image_processor
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "patch_size": ip.patch_size,
        "merge_size": ip.merge_size,
        "temporal_patch_size": ip.temporal_patch_size,
        "size": dict(ip.size),
        "image_mean": list(ip.image_mean),
        "image_std": list(ip.image_std),
        "processor_class": processor_class,
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")


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

    ``family`` is ``llava``, ``paligemma``, ``qwen2vl`` or ``qwen2_5vl`` (Qwen2.5-VL, served by the
    Qwen2-VL adapter).

    Overrides: ``vision_hidden_size`` (32), ``vision_layers`` (2), ``vision_heads`` (2),
    ``intermediate_size`` (2 * hidden), ``spatial_merge_size`` (Qwen2-VL, 2), ``min_pixels`` /
    ``max_pixels`` (Qwen2-VL), ``image_mean`` / ``image_std`` (0.5), ``max_position_embeddings`` (512).
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(_BUILDERS)}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    opts: dict[str, Any] = {
        **FAMILY_DEFAULTS[family],
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": 2 * hidden_size,
        "vision_hidden_size": 32,
        "vision_layers": 2,
        "vision_heads": 2,
        "spatial_merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "max_position_embeddings": 512,
    }
    if image_size is not None:
        opts["image_size"] = image_size
    if patch_size is not None:
        opts["patch_size"] = patch_size
    unknown = set(overrides) - set(opts) - {"min_pixels", "max_pixels"}
    if unknown:
        raise TypeError(f"unknown build_tiny options: {', '.join(sorted(unknown))}")
    opts.update(overrides)
    if not family.startswith("qwen") and opts["image_size"] % opts["patch_size"]:
        raise ValueError(
            f"image_size {opts['image_size']} must be a multiple of patch_size {opts['patch_size']}"
        )

    tokenizer = tiny_tokenizer(family, vocab_words)
    torch.manual_seed(seed)
    model, processor = _BUILDERS[family](tokenizer, opts)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if family.startswith("qwen"):
        _fix_qwen_processor_files(out, processor, _QWEN_PROCESSORS[family])
    return out
