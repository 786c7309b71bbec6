"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``).

What the family shows the language model, read from transformers' ``Idefics3Processor`` /
``SmolVLMProcessor``, their image processors and ``Idefics3Connector.pixel_shuffle``
(docs/ARCHITECTURE.md section 4.1b):

- **Tiles.** With ``do_image_splitting`` (the checkpoints' default) the image is resized so its
  longest edge is ``size["longest_edge"]``, then stretched so each side is a whole number of
  ``max_image_size`` tiles, and cut into ``rows x cols`` tiles, row-major; a **global view** (the
  whole image squashed to one tile) follows them. An image that needs a single tile is shown as
  that one view only. Without splitting the image is squashed to one tile: one grid.
- **Tokens.** Each tile is read by the SigLIP tower as ``(tile / patch)^2`` patches and pixel-shuffled
  by ``scale_factor`` into ``side x side`` tokens (side = tile / patch / scale), row-major: token
  ``(i, j)`` carries the ``scale x scale`` patches at rows ``i*scale..``, cols ``j*scale..``. The
  processor writes ``<fake_token_around_image><row_r_col_c>`` then the tile's image tokens for
  every tile, a newline after each tile row, then ``<fake_token_around_image><global-img>`` and
  the global view's tokens. Those text tokens are not image tokens, so VRP's grids are the image
  tokens in order: tile k's cells are image tokens ``[k*L, (k+1)*L)`` (L = side^2), the global
  view's the last L. In VRP's order the global view is grid 0 (tile 0), the tiles 1..n.
- **Pixels.** ``pixel_values`` is ``[batch, max tiles, C, tile, tile]``: an image's tiles in
  processing order (tiles row-major, the global view last), all-zero padding tiles after them
  (the model drops tiles whose every value is 0.0; VRP's grey is never exactly 0).

The stitched lattice is the tiles' cells over the original image, ``rows*side x cols*side``; each
tile covers ``1/rows x 1/cols`` of the original image (the two resizes stretch the whole image onto
the tiled canvas). Prompts come from the checkpoint's chat template (user: image, text).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.processing_utils import ProcessorMixin

from vrp.metrics.grids import Grid, Layout

from .base import Adapter, Encoded, FamilySpec, auto_processor_or_none, chosen_cell_boxes, tiled_layout
from .family import Family, TinyRecipe

if TYPE_CHECKING:
    from transformers import BatchFeature, PreTrainedModel, PreTrainedTokenizerFast

IDEFICS3 = FamilySpec(
    family="idefics3",
    model_types=("idefics3", "smolvlm"),
    decoder_layers="model.text_model.layers",
    final_norm="model.text_model.norm",
    unembedding="lm_head",
    attn="self_attn",
    mlp="mlp",
    norm_offset=0.0,
    prefix_bidirectional=False,
    fp16_nan=False,
    prompt_template=None,
    answer_separator=" ",
    notes=(
        "chat template: user content [image, text], add_generation_prompt=True",
        "grids: 0 = global view (side x side), 1..n = the tiles row-major; side = tile / patch / scale",
        "tiles and global view are separated by <fake_token_around_image>/<row_r_col_c>/<global-img> text "
        "tokens, which are not image tokens",
        "do_image_splitting=False shows one squashed view: a single grid",
    ),
)


class Idefics3Adapter(Adapter):
    """Idefics3 / SmolVLM: a global view and ``rows x cols`` pixel-shuffled tiles per image."""

    spec = IDEFICS3

    def _batch_images(self, images: Sequence[Image.Image]) -> list[Any]:
        """One list per prompt: ``SmolVLMProcessor`` reads a flat list as several images of one prompt."""
        return [[image] for image in images]

    # ----- geometry -----------------------------------------------------------------------------------
    def tile_size(self) -> int:
        """The square tile the vision tower reads, in pixels (``max_image_size``)."""
        return int(self.model.config.vision_config.image_size)

    def side(self) -> int:
        """Tokens along one side of a tile after the pixel shuffle."""
        vision = self.model.config.vision_config
        return int(vision.image_size) // int(vision.patch_size) // int(self.model.config.scale_factor)

    def splits(self, original: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of tiles the processor cuts an (h, w) image into; (0, 0) = one view, no tiles."""
        _n, rows, cols = self.processor.image_processor.get_number_of_image_patches(*original)
        return int(rows), int(cols)

    def _row_layout(
        self, batch: BatchFeature, row: int, original_size: tuple[int, int]
    ) -> tuple[tuple[int, int], tuple[int, int], Layout]:
        tile, side = self.tile_size(), self.side()
        if batch["pixel_values"].shape[-1] != tile or batch["pixel_values"].shape[-2] != tile:
            raise ValueError(
                f"the processor's tiles are {tuple(batch['pixel_values'].shape[-2:])} px, the vision tower "
                f"reads {tile} px: set the image processor's max_image_size to {{'longest_edge': {tile}}}"
            )
        cell = tile // side
        rows, cols = self.splits(original_size)
        if rows * cols == 0:  # one view: the squashed image is the only grid (tile pixels, tile cells)
            height, width = original_size
            canvas = (0.0, 0.0, float(tile), float(tile))
            whole = (0.0, 0.0, float(height), float(width))
            glob = Grid.uniform(0, side, side, np.arange(side * side), 0, canvas, whole, is_global=True)
            return (tile, tile), (cell, cell), Layout((glob,), (height, width), (side, side), side * side)
        return tiled_layout(rows, cols, side, tile, original_size)

    def _geometry_hint(self) -> str:
        return (
            "the processor's image_seq_len and the model's (image_size / patch_size / scale_factor)^2 "
            "tokens per tile disagree"
        )

    # ----- pixels -----------------------------------------------------------------------------------
    def mask_pixels(
        self, pixels: torch.Tensor, enc: Encoded, cells: Sequence[Sequence[int]], grey: torch.Tensor
    ) -> torch.Tensor:
        """Grey the chosen cells (flat ids over every grid) in ``pixel_values`` [B, tiles, C, H, W], in place.

        A grid's canvas is exactly one tile tensor: grid ``view`` k is ``pixels[row, k]``. A tile left
        all 0.0 is refused: the model would take it for padding and lose its tokens' features.
        """
        if pixels.dim() != 5:
            raise ValueError(f"expected pixel_values [batch, tiles, C, H, W], got {tuple(pixels.shape)}")
        for row, chosen in enumerate(cells):
            layout = enc.layouts[row]
            for index, (y0, x0, y1, x1) in chosen_cell_boxes(layout, chosen):
                pixels[row, layout.grids[index].view, :, y0:y1, x0:x1] = grey[:, None, None]
            if (pixels[row, : len(layout.grids)] == 0).flatten(1).all(dim=1).any():
                raise ValueError(
                    f"row {row}: masking left a tile whose every value is 0.0, which the model drops as "
                    "batch padding; mask with a grey that does not normalise to exactly 0"
                )
        return pixels

    def model_views(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """The squashed view when the model sees one grid, else the original image (the stitched lattice
        lies over the original image's area)."""
        views = []
        for image in images:
            if self.splits((image.height, image.width)) != (0, 0):
                views.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
                continue
            out = self.processor.image_processor(
                images=[[image]], do_rescale=False, do_normalize=False, return_tensors="np"
            )
            pixels = np.asarray(out["pixel_values"][0][0], dtype=np.float32)
            views.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(1, 2, 0))
        return views

    @classmethod
    def load_processor(cls, source: str) -> tuple[ProcessorMixin, bool]:
        """``AutoProcessor``; for SmolVLM(2) without num2words or torchvision (its video side), the
        image-only processor. Any other error propagates."""
        processor = auto_processor_or_none(
            source,
            errors=(ImportError, OSError, ValueError),
            missing=_video_extras_missing,
            words=("num2words", "video", "torchvision"),
        )
        if processor is not None:
            return processor, False
        from .qwen2vl import _read_chat_template  # the processor's template file, .jinja or legacy .json

        image_processor = transformers.AutoImageProcessor.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        config = transformers.AutoConfig.from_pretrained(source)
        vision = config.vision_config
        seq_len = (int(vision.image_size) // int(vision.patch_size) // int(config.scale_factor)) ** 2
        return (
            ImageOnlySmolVLMProcessor(
                image_processor,
                tokenizer,
                image_seq_len=seq_len,
                chat_template=_read_chat_template(source) or getattr(tokenizer, "chat_template", None),
            ),
            True,
        )


def _video_extras_missing() -> bool:
    return any(importlib.util.find_spec(name) is None for name in ("num2words", "torchvision"))


class ImageOnlySmolVLMProcessor(transformers.SmolVLMProcessor):
    """A ``SmolVLMProcessor`` without its video processor (which needs torchvision and num2words).

    ``ProcessorMixin`` derives the required sub-processors from ``__init__``'s parameters, so this
    signature (image processor + tokenizer) makes the video side optional; images and text go through
    the parent's unchanged code, which lays tiles out exactly as ``Idefics3Processor`` does.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        image_seq_len: int = 169,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        """The mixin's chat template, without the parent's video-frame defaults (no video processor)."""
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


#: the tiny checkpoints' chat template: Idefics3's "User:<image>question<end_of_utterance>\nAssistant:"
TINY_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _tiny(
    tokenizer: PreTrainedTokenizerFast, opts: dict[str, Any], *, smolvlm: bool = False
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """SigLIP-style tower + Llama decoder; tiles of ``image_size`` px, at most ``splits`` tiles a side."""
    from transformers import LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from .tiny import require_patch_multiple, text_kwargs

    require_patch_multiple(opts)
    size, patch, scale = opts["image_size"], opts["patch_size"], opts["scale_factor"]
    if (size // patch) % scale:
        raise ValueError(
            f"image_size / patch_size = {size // patch} must be a multiple of scale_factor {scale}"
        )
    image_args = {
        "size": {"longest_edge": opts["splits"] * size},
        "max_image_size": {"longest_edge": size},
        "do_image_splitting": bool(opts["do_image_splitting"]),
        "image_mean": opts["image_mean"],
        "image_std": opts["image_std"],
    }
    seq_len = (size // patch // scale) ** 2
    vision_args = {
        "hidden_size": opts["vision_hidden_size"],
        "intermediate_size": 2 * opts["vision_hidden_size"],
        "num_hidden_layers": opts["vision_layers"],
        "num_attention_heads": opts["vision_heads"],
        "image_size": size,
        "patch_size": patch,
    }
    text = LlamaConfig(**text_kwargs(tokenizer, opts))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if smolvlm:
        from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
        from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        processor: ProcessorMixin = ImageOnlySmolVLMProcessor(
            SmolVLMImageProcessorPil(**image_args),
            tokenizer,
            image_seq_len=seq_len,
            chat_template=TINY_CHAT_TEMPLATE,
        )
        config = SmolVLMConfig(
            vision_config=SmolVLMVisionConfig(**vision_args),
            text_config=text,
            scale_factor=scale,
            image_token_id=image_id,
        )
        return SmolVLMForConditionalGeneration(config), processor
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    processor = Idefics3Processor(
        Idefics3ImageProcessorPil(**image_args),
        tokenizer,
        image_seq_len=seq_len,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**vision_args),
        text_config=text,
        scale_factor=scale,
        image_token_id=image_id,
    )
    return Idefics3ForConditionalGeneration(config), processor


def _tiny_smolvlm(
    tokenizer: PreTrainedTokenizerFast, opts: dict[str, Any]
) -> tuple[PreTrainedModel, ProcessorMixin]:
    return _tiny(tokenizer, opts, smolvlm=True)


def _stock_processor_class(out: Path, _processor: Any) -> None:
    """Make the saved files name the stock ``SmolVLMProcessor``, as a hub checkpoint does: with num2words
    and torchvision ``AutoProcessor`` builds it, without them ``load_adapter`` builds the image-only one."""
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = out / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["processor_class"] = "SmolVLMProcessor"
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


_SPECIALS = (
    "<unk>",
    "<|begin_of_text|>",
    "<end_of_utterance>",
    "<pad>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),  # the processor's 6 x 6
)
_ROLES = {
    "unk_token": "<unk>",
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<end_of_utterance>",
    "pad_token": "<pad>",
}
# 32 px tiles read by 8x8 patches of 4 px, pixel-shuffled by 2: 4x4 tokens of 8 px per tile; images
# are stretched to at most 2 tiles a side (64 px), plus the global view
_TINY_DEFAULTS: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 4,
    "scale_factor": 2,
    "splits": 2,
    "do_image_splitting": 1,
}

FAMILY = Family(
    adapter=Idefics3Adapter,
    names={
        "smolvlm-256m": "HuggingFaceTB/SmolVLM-256M-Instruct",
        "smolvlm-500m": "HuggingFaceTB/SmolVLM-500M-Instruct",
        "smolvlm-2b": "HuggingFaceTB/SmolVLM-Instruct",
        "smolvlm2-256m": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
        "smolvlm2-500m": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
        "smolvlm2-2.2b": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
        "idefics3-8b": "HuggingFaceM4/Idefics3-8B-Llama3",
    },
    tiny={
        "idefics3": TinyRecipe(specials=_SPECIALS, roles=_ROLES, build=_tiny, defaults=_TINY_DEFAULTS),
        "smolvlm": TinyRecipe(
            specials=_SPECIALS,
            roles=_ROLES,
            build=_tiny_smolvlm,
            defaults=_TINY_DEFAULTS,
            after_save=_stock_processor_class,
        ),
    },
)
