"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): native-resolution ViT, m x m token merge, M-RoPE.

What the family needs that the others do not: a dynamic grid per image, read from ``image_grid_thw``
(t, h, w in vision patches); the LLM sees one token per merged m x m block, in row-major order over the
(h/m, w/m) merged grid, so one grid cell is an (m*patch)-pixel square of the image the processor
resized to (h*patch, w*patch) (``smart_resize`` keeps both sides multiples of m*patch and the pixel
count within ``min_pixels``/``max_pixels``). The prompt is the checkpoint's chat template with an image
then the text and ``add_generation_prompt``. ``mm_token_type_ids`` must reach the model (M-RoPE needs
it). Without torchvision ``AutoProcessor`` fails on the video processor, so loading builds an
image-only processor (see ``loading.py``). fp16 gives NaNs (the study used bfloat16).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import BatchFeature, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from .base import Adapter, FamilySpec

QUESTION_SLOT = "{question}"

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
    notes=(
        "chat template: user content [image, text], add_generation_prompt=True",
        "grid = image_grid_thw (h, w) / spatial_merge_size; cell = merge*patch pixels",
        "min_pixels/max_pixels bound the resize (recorded in the run config)",
        "AutoProcessor needs torchvision for the video processor: image-only processor built without it",
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
    """Qwen2-VL / Qwen2.5-VL: chat-template prompts and a per-image merged grid."""

    spec = QWEN2VL

    def _messages(self, question: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    def prompt_template_record(self) -> str:
        if self._template is not None:
            return self._template
        return self.processor.apply_chat_template(
            self._messages(QUESTION_SLOT), add_generation_prompt=True, tokenize=False
        )

    def prompt(self, question: str) -> str:
        if self._template is not None:
            return super().prompt(question)
        return self.processor.apply_chat_template(
            self._messages(question), add_generation_prompt=True, tokenize=False
        )

    def text_prompt(self, question: str) -> str:
        if self._template is not None:
            return super().text_prompt(question)
        messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

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
