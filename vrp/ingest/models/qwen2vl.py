"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): native-resolution ViT, m x m token merge, M-RoPE.

What the family needs that the others do not: a dynamic grid per image, read from ``image_grid_thw``
(t, h, w in vision patches); the LLM sees one token per merged m x m block, in row-major order over the
(h/m, w/m) merged grid, so one grid cell is an (m*patch)-pixel square of the image the processor
resized to (h*patch, w*patch) (``smart_resize`` keeps both sides multiples of m*patch and the pixel
count within ``min_pixels``/``max_pixels``). The prompt is the checkpoint's chat template with an image
then the text and ``add_generation_prompt``. ``mm_token_type_ids`` must reach the model (M-RoPE needs
it); generated tokens are text, type 0. Without torchvision ``AutoProcessor`` fails on the video
processor, so ``load_processor`` builds an image-only processor. The pixels reach the model as
flattened patches (one row per vision patch, ordered by merged cell), so masking a cell sets
``merge**2`` consecutive rows. fp16 gives NaNs (the study used bfloat16).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import BatchFeature, PreTrainedModel, PreTrainedTokenizerFast, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from .base import Adapter, Encoded, FamilySpec, auto_processor_or_none
from .family import Family, TinyRecipe, ToyRecipe

QWEN2VL = FamilySpec(
    family="qwen2vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    unembedding="lm_head",
    attn="self_attn",
    mlp="mlp",
    norm_offset=0.0,
    prefix_bidirectional=False,
    fp16_nan=True,
    fp16_reason=(
        "Qwen2-VL produced NaN logits in float16 in the study's runs (its scripts switched to bfloat16); "
        "use --dtype bfloat16 or float32"
    ),
    prompt_template=None,
    dynamic_resolution=True,
    decode_state=("model.rope_deltas",),
    generated_token_types={"mm_token_type_ids": 0},
    notes=(
        "chat template: user content [image, text], add_generation_prompt=True",
        "grid = image_grid_thw (h, w) / spatial_merge_size; cell = merge*patch pixels",
        "min_pixels/max_pixels bound the resize (recorded in the run config)",
        "AutoProcessor needs torchvision for the video processor: image-only processor built without it",
        "generated tokens are text: mm_token_type_ids 0",
    ),
)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """A ``Qwen2VLProcessor`` without a video processor, for environments without torchvision.

    ``ProcessorMixin`` derives its required sub-processors from ``__init__``'s parameters, so this
    signature (image processor + tokenizer) is what makes the video processor optional; images and text
    go through the parent's unchanged code.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL: a per-image merged grid (prompts: the checkpoint's chat template)."""

    spec = QWEN2VL

    def _row_geometry(self, batch: BatchFeature, row: int) -> tuple[tuple[int, int], tuple[int, int]]:
        vision = self.model.config.vision_config
        patch, merge = int(vision.patch_size), int(vision.spatial_merge_size)
        t, h, w = (int(v) for v in batch["image_grid_thw"][row])
        if t != 1:
            raise ValueError(f"row {row}: image_grid_thw t={t}; VRP handles single still images (t=1)")
        return (h * patch, w * patch), (merge * patch, merge * patch)

    def _view_pixels(self, processed: BatchFeature, row: int) -> np.ndarray:
        """Undo the processor's patch flattening: rows of (merged block, patch) back to [3, H, W].

        The processor lays patches out merged-block by merged-block (row-major over the merged
        grid, then row-major inside each m x m block), each patch as (channel, time, p, p).
        """
        ip = self.processor.image_processor
        patch, merge, frames = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
        grids = np.asarray(processed["image_grid_thw"])
        start = int(np.prod(grids[:row], axis=1).sum()) if row else 0
        _t, gh, gw = (int(v) for v in grids[row])
        flat = np.asarray(processed["pixel_values"][start : start + gh * gw], dtype=np.float32)
        blocks = flat.reshape(gh // merge, gw // merge, merge, merge, 3, frames, patch, patch)[
            :, :, :, :, :, 0
        ]
        # (gh/m, gw/m, m, m, C, p, p) -> (C, gh/m, m, p, gw/m, m, p)
        return blocks.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * patch, gw * patch)

    def _geometry_hint(self) -> str:
        return "image_grid_thw / spatial_merge_size should give one token per merged patch"

    def mask_pixels(
        self, pixels: torch.Tensor, enc: Encoded, cells: Sequence[Sequence[int]], grey: torch.Tensor
    ) -> torch.Tensor:
        """Grey whole merged cells in the flattened layout, in place.

        Image ``row`` owns ``t*h*w`` consecutive patch rows, ordered by merged cell, then the
        ``merge x merge`` patches inside it; each row holds ``C`` channel blocks of ``T * P * P``
        values. A merged cell is therefore ``merge**2`` consecutive rows, all set.
        """
        ip = self.processor.image_processor
        patch, merge, temporal = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
        channels = grey.numel()
        block = temporal * patch * patch
        if pixels.shape[1] != channels * block:
            raise ValueError(
                f"pixel_values rows have {pixels.shape[1]} values, "
                f"expected {channels}x{temporal}x{patch}x{patch}"
            )
        row_values = grey.repeat_interleave(block)  # [C * T * P * P]
        thw = enc.inputs["image_grid_thw"].tolist()
        offsets = np.cumsum([0] + [t * h * w for t, h, w in thw])
        for row, chosen in enumerate(cells):
            grid_h, grid_w = enc.grids[row]
            for cell in chosen:
                if not 0 <= cell < grid_h * grid_w:
                    raise IndexError(f"cell {cell} outside the {grid_h}x{grid_w} grid")
                start = int(offsets[row]) + cell * merge * merge
                pixels[start : start + merge * merge] = row_values
        return pixels

    @classmethod
    def load_processor(cls, source: str) -> tuple[ProcessorMixin, bool]:
        """``AutoProcessor``, or the image-only processor when torchvision (for video) is missing.

        Only a failure caused by the missing video processor falls back; any other error propagates.
        """
        processor = auto_processor_or_none(
            source,
            errors=(ImportError, OSError, ValueError),
            missing=_torchvision_missing,
            words=("video", "torchvision"),
        )
        if processor is not None:
            return processor, False
        image_processor = transformers.AutoImageProcessor.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        chat_template = _read_chat_template(source) or getattr(tokenizer, "chat_template", None)
        return ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=chat_template), True


def _torchvision_missing() -> bool:
    return importlib.util.find_spec("torchvision") is None


def _read_chat_template(source: str) -> str | None:
    """The processor chat template saved beside the checkpoint (``.jinja`` or legacy ``.json``)."""
    path = Path(source)
    if not path.is_dir():
        from huggingface_hub import try_to_load_from_cache

        for name in ("chat_template.jinja", "chat_template.json"):
            cached = try_to_load_from_cache(source, name)
            if isinstance(cached, str):
                path = Path(cached).parent
                break
        else:
            return None
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None


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
"""The tiny checkpoints' chat template: Qwen2-VL's layout of system, user (image, text), assistant."""


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


def _tiny(
    tokenizer: PreTrainedTokenizerFast, opts: dict[str, Any], *, v2_5: bool = False
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Qwen2-VL (or Qwen2.5-VL) with the image-only processor and a minimal chat template."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .tiny import text_kwargs

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
    text_args = text_kwargs(tokenizer, opts)
    text_args["rope_parameters"] = _text_rope(opts["hidden_size"] // opts["num_heads"])
    text_args["bos_token_id"] = None
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
        text_config=text_args,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return model_class(config), processor


def _tiny_2_5(
    tokenizer: PreTrainedTokenizerFast, opts: dict[str, Any]
) -> tuple[PreTrainedModel, ProcessorMixin]:
    return _tiny(tokenizer, opts, v2_5=True)


def _stock_processor_files(out: Path, processor: Any, processor_class: str) -> None:
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


_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)
_ROLES = {"unk_token": "<unk>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
_TINY_DEFAULTS: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 4,
    "spatial_merge_size": 2,
    "min_pixels": None,
    "max_pixels": None,
}

FAMILY = Family(
    adapter=Qwen2VLAdapter,
    names={"qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct", "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct"},
    tiny={
        "qwen2vl": TinyRecipe(
            specials=_SPECIALS,
            roles=_ROLES,
            build=_tiny,
            defaults=_TINY_DEFAULTS,
            after_save=lambda out, processor: _stock_processor_files(out, processor, "Qwen2VLProcessor"),
        ),
        "qwen2_5vl": TinyRecipe(
            specials=_SPECIALS,
            roles=_ROLES,
            build=_tiny_2_5,
            defaults=_TINY_DEFAULTS,
            after_save=lambda out, processor: _stock_processor_files(out, processor, "Qwen2_5_VLProcessor"),
        ),
    },
    # one image token per 8 px patch: a 10x10 grid at the toy's 80 px
    toy=ToyRecipe(build_overrides={"spatial_merge_size": 1}),
)
