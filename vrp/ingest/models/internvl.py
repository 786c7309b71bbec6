"""InternVL (``InternVLForConditionalGeneration``, the transformers-native ``-hf`` checkpoints).

What the family shows the language model, read from transformers' ``InternVLProcessor``, the
``GotOcr2ImageProcessor`` it uses and ``InternVLModel.pixel_shuffle`` (docs/ARCHITECTURE.md section
4.1b):

- **Dynamic tiles.** With ``crop_to_patches`` (the processor's default for images) the image is
  resized to the ``cols x rows`` arrangement of ``size`` tiles whose aspect ratio is closest to the
  image's (``get_optimal_tiled_canvas``, between ``min_patches`` and ``max_patches`` tiles) and cut
  into those tiles, row-major; when there is more than one tile a **thumbnail** (the whole image
  squashed to one tile) follows them. A one-tile image is that one view only: one grid.
- **Tokens.** Each tile is read by the InternViT tower as ``(tile / patch)^2`` patches (the CLS
  feature dropped, ``vision_feature_select_strategy="default"``) and pixel-shuffled by
  ``downsample_ratio`` into ``side x side`` tokens, row-major, token ``(i, j)`` carrying the
  patches at rows ``i/ratio..`` and cols ``j/ratio..``. The prompt holds ``<img>``, then every
  tile's ``<IMG_CONTEXT>`` tokens back to back (the thumbnail's last), then ``</img>``: no separator
  between tiles. In VRP's order the thumbnail is grid 0 (tile 0), the tiles 1..n.
- **Pixels.** ``pixel_values`` is ``[all tiles of the batch, C, tile, tile]``: each image's tiles in
  processing order, images one after another.

The stitched lattice is the tiles' cells over the original image, ``rows*side x cols*side``; each
tile covers ``1/rows x 1/cols`` of the original image (the resize stretches the whole image onto the
tiled canvas). Prompts come from the checkpoint's chat template (user: image, text). Without
torchvision ``AutoProcessor`` fails on the video processor, so ``load_processor`` builds an
image-only processor.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
from transformers.processing_utils import ProcessorMixin

from vrp.metrics.grids import Grid, Layout

from .base import Adapter, Encoded, FamilySpec, auto_processor_or_none, chosen_cell_boxes, tiled_layout
from .family import Family, TinyRecipe

if TYPE_CHECKING:
    from transformers import BatchFeature, PreTrainedModel, PreTrainedTokenizerFast

INTERNVL = FamilySpec(
    family="internvl",
    model_types=("internvl",),
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    unembedding="lm_head",
    attn="self_attn",
    mlp="mlp",
    norm_offset=0.0,
    prefix_bidirectional=False,
    fp16_nan=False,
    prompt_template=None,
    notes=(
        "chat template: user content [image, text], add_generation_prompt=True",
        "grids: 0 = thumbnail (side x side), 1..n = the dynamic tiles row-major; side = tile / patch * ratio",
        "tiles are contiguous <IMG_CONTEXT> runs between <img> and </img>, the thumbnail's last",
        "max_patches=1 shows one squashed view: a single grid (the processor forces crop_to_patches)",
        "needs vision_feature_select_strategy='default' (CLS dropped)",
    ),
)


class InternVLAdapter(Adapter):
    """InternVL: a thumbnail and ``rows x cols`` pixel-shuffled dynamic tiles per image."""

    spec = INTERNVL

    # ----- geometry -----------------------------------------------------------------------------------
    def tile_size(self) -> int:
        """The square tile the vision tower reads, in pixels."""
        size = self.model.config.vision_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def side(self) -> int:
        """Tokens along one side of a tile after the pixel shuffle."""
        patch = self.model.config.vision_config.patch_size
        patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        return round(self.tile_size() // patch * float(self.model.config.downsample_ratio))

    def _image_kwargs(self) -> dict[str, Any]:
        """The image processor's settings as the processor calls it: ``InternVLProcessor`` forces
        ``crop_to_patches=True`` whatever the image processor's own attribute says."""
        ip = self.processor.image_processor
        merged = self.processor._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs)[
            "images_kwargs"
        ]
        return {
            key: merged.get(key, getattr(ip, key))
            for key in ("crop_to_patches", "min_patches", "max_patches")
        }

    def tiles(self, original: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of tiles the processor cuts an (h, w) image into; (1, 1) = one view, no thumbnail."""
        kwargs = self._image_kwargs()
        if not (kwargs["crop_to_patches"] and kwargs["max_patches"] > 1):
            return 1, 1
        size = dict(self.processor.image_processor.size)
        cols, rows = get_optimal_tiled_canvas(
            tuple(original),
            (int(size["height"]), int(size["width"])),
            int(kwargs["min_patches"]),
            int(kwargs["max_patches"]),
        )
        return int(rows), int(cols)

    def _row_layout(
        self, batch: BatchFeature, row: int, original_size: tuple[int, int]
    ) -> tuple[tuple[int, int], tuple[int, int], Layout]:
        self._check_strategy()
        tile, side = self.tile_size(), self.side()
        if tuple(batch["pixel_values"].shape[-2:]) != (tile, tile):
            raise ValueError(
                f"the processor's tiles are {tuple(batch['pixel_values'].shape[-2:])} px, the vision tower "
                f"reads {tile} px: set the image processor's size to {{'height': {tile}, 'width': {tile}}}"
            )
        cell = tile // side
        rows, cols = self.tiles(original_size)
        if rows * cols == 1:  # one view: the squashed image is the only grid (tile pixels, tile cells)
            height, width = original_size
            canvas = (0.0, 0.0, float(tile), float(tile))
            whole = (0.0, 0.0, float(height), float(width))
            grid = Grid.uniform(0, side, side, np.arange(side * side), 0, canvas, whole)
            return (tile, tile), (cell, cell), Layout((grid,), (height, width), (side, side), side * side)
        return tiled_layout(rows, cols, side, tile, original_size)  # the thumbnail is grid 0

    def _check_strategy(self) -> None:
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r}: VRP maps InternVL's image tokens to grids "
                "only for 'default' (the CLS token dropped); load the checkpoint with its default setting"
            )

    def _geometry_hint(self) -> str:
        return (
            "the processor's image_seq_length and the model's (image_size / patch_size * downsample_ratio)^2 "
            "tokens per tile disagree"
        )

    # ----- pixels -----------------------------------------------------------------------------------
    def mask_pixels(
        self, pixels: torch.Tensor, enc: Encoded, cells: Sequence[Sequence[int]], grey: torch.Tensor
    ) -> torch.Tensor:
        """Grey the chosen cells (flat ids over every grid) in ``pixel_values`` [tiles, C, H, W], in place.

        Row ``b``'s tiles follow the earlier rows' (one tensor per grid), so grid ``view`` k of row ``b``
        is ``pixels[offset_b + k]``.
        """
        if pixels.dim() != 4:
            raise ValueError(f"expected pixel_values [tiles, C, H, W], got {tuple(pixels.shape)}")
        offsets = np.cumsum([0] + [len(layout.grids) for layout in enc.layouts])
        if offsets[-1] != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} tiles in pixel_values, the batch's grids need {offsets[-1]}")
        for row, chosen in enumerate(cells):
            layout = enc.layouts[row]
            for index, (y0, x0, y1, x1) in chosen_cell_boxes(layout, chosen):
                pixels[int(offsets[row]) + layout.grids[index].view, :, y0:y1, x0:x1] = grey[:, None, None]
        return pixels

    def model_views(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """The squashed view when the model sees one grid, else the original image (the stitched lattice
        lies over the original image's area)."""
        views = []
        for image in images:
            if self.tiles((image.height, image.width)) != (1, 1):
                views.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
                continue
            out = self.processor.image_processor(
                images=[image],
                do_rescale=False,
                do_normalize=False,
                return_tensors="np",
                **self._image_kwargs(),
            )
            pixels = np.asarray(out["pixel_values"][0], dtype=np.float32)
            views.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(1, 2, 0))
        return views

    @classmethod
    def load_processor(cls, source: str) -> tuple[ProcessorMixin, bool]:
        """``AutoProcessor``, or the image-only processor when torchvision (for video) is missing.

        Only a failure caused by the missing video processor falls back; any other error propagates.
        """
        processor = auto_processor_or_none(
            source,
            errors=(ImportError, OSError, ValueError, AttributeError),
            missing=_torchvision_missing,
            words=("video", "torchvision"),
        )
        if processor is not None:
            return processor, False
        from .qwen2vl import _read_chat_template  # the processor's template file, .jinja or legacy .json

        image_processor = transformers.AutoImageProcessor.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        config = transformers.AutoConfig.from_pretrained(source)
        return (
            ImageOnlyInternVLProcessor(
                image_processor,
                tokenizer,
                image_seq_length=int(config.image_seq_length),
                chat_template=_read_chat_template(source) or getattr(tokenizer, "chat_template", None),
            ),
            True,
        )


def _torchvision_missing() -> bool:
    return importlib.util.find_spec("torchvision") is None


class ImageOnlyInternVLProcessor(transformers.InternVLProcessor):
    """An ``InternVLProcessor`` without a video processor, for environments without torchvision.

    ``ProcessorMixin`` derives its required sub-processors from ``__init__``'s parameters, so this
    signature (image processor + tokenizer) makes the video processor optional; images and text go
    through the parent's unchanged code.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        image_seq_length: int = 256,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )


#: the tiny checkpoints' chat template: InternVL3's Qwen2 layout (user turn: image line, then text)
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny(tokenizer: PreTrainedTokenizerFast, opts: dict[str, Any]) -> tuple[PreTrainedModel, ProcessorMixin]:
    """InternViT-style tower + Qwen2 decoder; ``image_size`` px tiles, at most ``max_patches`` tiles."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    from .tiny import require_patch_multiple, text_kwargs, vision_kwargs

    require_patch_multiple(opts)
    size, patch = opts["image_size"], opts["patch_size"]
    if (size // patch) % 2:
        raise ValueError(f"image_size / patch_size = {size // patch} must be even (downsample_ratio 0.5)")
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": size, "width": size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=opts["max_patches"],
        image_mean=opts["image_mean"],
        image_std=opts["image_std"],
    )
    seq_len = (size // patch // 2) ** 2
    processor = ImageOnlyInternVLProcessor(
        image_processor, tokenizer, image_seq_length=seq_len, chat_template=TINY_CHAT_TEMPLATE
    )
    vision = InternVLVisionConfig(**vision_kwargs(opts))
    config = InternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(**text_kwargs(tokenizer, opts)),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=seq_len,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return InternVLForConditionalGeneration(config), processor


def _stock_processor_class(out: Path, _processor: Any) -> None:
    """Make the saved files name the stock ``InternVLProcessor``, as a hub checkpoint does: with
    torchvision ``AutoProcessor`` builds it, without it ``load_adapter`` builds the image-only one."""
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = out / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["processor_class"] = "InternVLProcessor"
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


FAMILY = Family(
    adapter=InternVLAdapter,
    names={
        "internvl3-1b": "OpenGVLab/InternVL3-1B-hf",
        "internvl3-2b": "OpenGVLab/InternVL3-2B-hf",
        "internvl3-8b": "OpenGVLab/InternVL3-8B-hf",
        "internvl3-14b": "OpenGVLab/InternVL3-14B-hf",
    },
    tiny={
        "internvl": TinyRecipe(
            specials=(
                "<unk>",
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "<img>",
                "</img>",
                "<IMG_CONTEXT>",
                "<video>",
            ),
            roles={"unk_token": "<unk>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
            build=_tiny,
            # 32 px tiles read by 8x8 patches of 4 px, pixel-shuffled 2x2: 4x4 tokens of 8 px per tile;
            # up to 4 tiles plus the thumbnail
            defaults={"image_size": 32, "patch_size": 4, "max_patches": 4},
            named_specials={
                "start_image_token": "<img>",
                "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>",
            },
            after_save=_stock_processor_class,
        )
    },
)
