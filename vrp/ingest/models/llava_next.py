"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres, a global view plus a high-res grid.

What the family shows the model, read from transformers' ``LlavaNextModel.pack_image_features``
and the image processor (docs/ARCHITECTURE.md section 4.1b):

- **grid 0, the global view**: the whole image squashed to the vision tower's square
  (``pixel_values[row, 0]``), ``S x S`` tokens (S = image_size / patch; 24 for 336/14), no separator.
- **grid 1, the high-res view**: the processor picks the best of ``image_grid_pinpoints``
  (``select_best_resolution``), resizes the image into it keeping its aspect ratio, pads it centred
  with zeros and cuts that canvas into image_size tiles (``pixel_values[row, 1:]``, row-major). The
  model stitches the tiles' features back into one ``(nph*S) x (npw*S)`` grid, removes the padded
  rows or columns (``unpad_image``) and appends an ``image_newline`` token to each row. The language
  model reads this as ONE grid, so VRP keeps it as one grid (not one per tile); its newline tokens
  are image tokens in no grid.

The stitched lattice is the high-res grid's shape over the original image. Every image token is
the image-token id in ``input_ids``; ``encode`` checks their count against this layout.
``vision_feature_select_strategy="full"`` keeps CLS tokens that have no place on a grid: refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution

from vrp.metrics.grids import Grid, Layout

from .base import Adapter, Encoded, FamilySpec, chosen_cell_boxes
from .family import Family, TinyRecipe

if TYPE_CHECKING:
    from transformers import BatchFeature, PreTrainedModel, PreTrainedTokenizerFast
    from transformers.processing_utils import ProcessorMixin


LLAVA_NEXT = FamilySpec(
    family="llava_next",
    model_types=("llava_next",),
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    unembedding="lm_head",
    attn="self_attn",
    mlp="mlp",
    norm_offset=0.0,
    prefix_bidirectional=False,
    fp16_nan=False,
    prompt_template=None,
    answer_separator=" ",
    notes=(
        "prompt: the checkpoint's chat template (user: image, text), or --prompt-template",
        "grids: 0 = global view (S x S), 1 = the unpadded anyres grid with a newline token after each row",
        "needs vision_feature_select_strategy='default' (CLS dropped)",
    ),
)


@dataclass(frozen=True)
class Anyres:
    """Where one image's anyres pixels and tokens lie (all from the processor's and model's own rules).

    ``tile``: the vision tower's square in pixels, read by ``side`` x ``side`` patches of ``patch``
    pixels (``side * patch`` may fall short of ``tile``: SigLIP's 384 px tile is read as 27 x 14 =
    378 px); ``tiles``: (nph, npw); ``resized``/``paste``: the image's size inside the padded canvas
    and its top-left corner there; ``unpadded``: (top, left, rows, cols) of the high-res feature grid
    kept after ``unpad_image``, in tile-feature cells; ``grid``: the high-res grid's (rows, cols) as
    the language model reads it (fewer when the family resamples it).
    """

    original: tuple[int, int]
    tile: int
    patch: int
    side: int
    tiles: tuple[int, int]
    resized: tuple[int, int]
    paste: tuple[int, int]
    unpadded: tuple[int, int, int, int]
    grid: tuple[int, int]

    def _canvas(self, u: np.ndarray, *, end: bool) -> np.ndarray:
        """Feature coordinate (in cells along one axis of the stitched tiles) -> canvas pixel."""
        t = np.ceil(u / self.side) - 1 if end else np.floor(u / self.side)
        t = np.maximum(t, 0)
        return t * self.tile + (u - t * self.side) * self.patch

    def high_res_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Canvas-pixel (y, x) spans of the high-res grid's rows and columns, ``[n, 2]`` each.

        Row k of ``grid`` rows covers the unpadded feature rows ``[top + k*s, top + (k+1)*s)`` with
        s = unpadded rows / grid rows (1 unless the grid was resampled).
        """
        top, left, rows, cols = self.unpadded
        out = []
        for start, n_in, n_out in ((top, rows, self.grid[0]), (left, cols, self.grid[1])):
            edges = start + np.arange(n_out + 1) * (n_in / n_out)
            out.append(
                np.stack([self._canvas(edges[:-1], end=False), self._canvas(edges[1:], end=True)], axis=1)
            )
        return out[0], out[1]

    def to_original(self, y_spans: np.ndarray, x_spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Canvas-pixel spans in the original image's pixels (undoing the centred pad and the resize)."""
        (oh, ow), (rh, rw), (py, px) = self.original, self.resized, self.paste
        return (y_spans - py) * oh / rh, (x_spans - px) * ow / rw


def anyres_geometry(
    original: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile: int, patch: int
) -> Anyres:
    """The anyres geometry of an (h, w) image, following transformers' processor and ``unpad_image``."""
    oh, ow = original
    best_h, best_w = select_best_resolution((oh, ow), [list(p) for p in pinpoints])
    # the processor's aspect-kept resize into the best resolution (get_patch_output_size), then a
    # centred zero pad (divmod of the slack, extra pixel after)
    scale_w, scale_h = best_w / ow, best_h / oh
    if scale_w < scale_h:
        rh, rw = min(math.ceil(oh * scale_w), best_h), best_w
    else:
        rh, rw = best_h, min(math.ceil(ow * scale_h), best_w)
    paste = ((best_h - rh) // 2, (best_w - rw) // 2)
    side = tile // patch
    nph, npw = best_h // tile, best_w // tile
    cur_h, cur_w = nph * side, npw * side
    # unpad_image on the feature grid: padding rows (or columns) removed symmetrically
    top = left = 0
    rows, cols = cur_h, cur_w
    if ow / oh > cur_w / cur_h:
        new_h = int(round(oh * (cur_w / ow), 7))
        top = (cur_h - new_h) // 2
        rows = cur_h - 2 * top
    else:
        new_w = int(round(ow * (cur_h / oh), 7))
        left = (cur_w - new_w) // 2
        cols = cur_w - 2 * left
    return Anyres(
        (oh, ow), tile, patch, side, (nph, npw), (rh, rw), paste, (top, left, rows, cols), (rows, cols)
    )


class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT: a global view (grid 0) and the unpadded anyres grid with newline tokens (grid 1)."""

    spec = LLAVA_NEXT

    # ----- geometry ----------------------------------------------------------------------------------
    def anyres(self, original: tuple[int, int]) -> Anyres:
        config = self.model.config
        vision = config.vision_config
        return anyres_geometry(
            original, config.image_grid_pinpoints, int(vision.image_size), int(vision.patch_size)
        )

    def _high_res(self, geometry: Anyres) -> Anyres:
        """The high-res grid the language model reads (LLaVA-NeXT: the unpadded grid itself)."""
        return geometry

    def _base_tokens(self, geometry: Anyres) -> int:
        return geometry.side * geometry.side

    def _row_layout(
        self, batch: BatchFeature, row: int, original_size: tuple[int, int]
    ) -> tuple[tuple[int, int], tuple[int, int], Layout]:
        self._check_strategy()
        oh, ow = (int(v) for v in batch["image_sizes"][row])
        geometry = self._high_res(self.anyres((oh, ow)))
        side, patch, tile = geometry.side, geometry.patch, geometry.tile
        base = self._base_tokens(geometry)
        # the global view: the whole image squashed to one tile, read by side x side patches
        spans = np.stack([np.arange(side) * patch, (np.arange(side) + 1) * patch], axis=1).astype(float)
        glob = Grid(
            0, side, side, np.arange(side * side), 0, spans, spans, spans * oh / tile, spans * ow / tile, True
        )
        rows, cols = geometry.grid
        # row r of the high-res grid: cols cells, then one image_newline token
        positions = base + (np.arange(rows)[:, None] * (cols + 1) + np.arange(cols)[None, :]).ravel()
        y_spans, x_spans = geometry.high_res_spans()
        image_y, image_x = geometry.to_original(y_spans, x_spans)
        high = Grid(1, rows, cols, positions, 1, y_spans, x_spans, image_y, image_x)
        layout = Layout((glob, high), (oh, ow), (rows, cols), base + rows * (cols + 1))
        cell = (max(1, round(oh / rows)), max(1, round(ow / cols)))
        return (oh, ow), cell, layout

    def _check_strategy(self) -> None:
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r}: VRP maps LLaVA-NeXT's image tokens to grids "
                "only for 'default' (the CLS token dropped); load the checkpoint with its default setting"
            )

    def _geometry_hint(self) -> str:
        return (
            "the processor's image_grid_pinpoints and the model config's disagree, or the CLS token is kept"
        )

    # ----- pixels --------------------------------------------------------------------------------------
    def mask_pixels(
        self, pixels: torch.Tensor, enc: Encoded, cells: Sequence[Sequence[int]], grey: torch.Tensor
    ) -> torch.Tensor:
        """Grey the chosen cells (flat ids over both grids) in ``pixel_values`` [B, tiles, C, H, W], in place.

        A global-view cell is a box of ``pixel_values[row, 0]``; a high-res cell is a box of the padded
        canvas, which may straddle tiles: each part goes to its tile ``1 + ty * npw + tx``.
        """
        if pixels.dim() != 5:
            raise ValueError(f"expected pixel_values [batch, tiles, C, H, W], got {tuple(pixels.shape)}")
        for row, chosen in enumerate(cells):
            layout = enc.layouts[row]
            geometry = self.anyres(enc.original_sizes[row])
            tile, npw = geometry.tile, geometry.tiles[1]
            for index, (y0, x0, y1, x1) in chosen_cell_boxes(layout, chosen):
                if index == 0:
                    pixels[row, 0, :, y0:y1, x0:x1] = grey[:, None, None]
                    continue
                for ty in range(y0 // tile, (y1 - 1) // tile + 1):
                    for tx in range(x0 // tile, (x1 - 1) // tile + 1):
                        ty0, tx0 = ty * tile, tx * tile
                        pixels[
                            row,
                            1 + ty * npw + tx,
                            :,
                            max(y0, ty0) - ty0 : min(y1, ty0 + tile) - ty0,
                            max(x0, tx0) - tx0 : min(x1, tx0 + tile) - tx0,
                        ] = grey[:, None, None]
        return pixels

    def model_views(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """The original images: the stitched maps lie on a lattice over the original image's area."""
        return [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]


#: the tiny checkpoints' chat template: LLaVA-1.5's prompt, spelt with the word-level vocabulary
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_pinpoints(size: int) -> list[list[int]]:
    """Anyres resolutions of a tiny checkpoint: 1x2, 2x1 and 2x2 tiles of ``size`` pixels."""
    return [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]


def _tiny(tokenizer: PreTrainedTokenizerFast, opts: dict[str, Any]) -> tuple[PreTrainedModel, ProcessorMixin]:
    """CLIP vision tower + Llama decoder with anyres tiles of ``image_size`` pixels."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from .tiny import require_patch_multiple, text_kwargs, vision_kwargs

    require_patch_multiple(opts)
    size, patch = opts["image_size"], opts["patch_size"]
    pinpoints = tiny_pinpoints(size)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=pinpoints,
        image_mean=opts["image_mean"],
        image_std=opts["image_std"],
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=TINY_CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(**vision_kwargs(opts), projection_dim=opts["vision_hidden_size"])
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text_kwargs(tokenizer, opts)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=(size // patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return LlavaNextForConditionalGeneration(config), processor


FAMILY = Family(
    adapter=LlavaNextAdapter,
    names={
        "llava-v1.6-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
        "llava-v1.6-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
        "llava-v1.6-vicuna-13b": "llava-hf/llava-v1.6-vicuna-13b-hf",
        "llava-v1.6-34b": "llava-hf/llava-v1.6-34b-hf",
    },
    tiny={
        "llava_next": TinyRecipe(
            specials=("<unk>", "<s>", "</s>", "<pad>", "<image>"),
            roles={"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
            build=_tiny,
            defaults={"image_size": 32, "patch_size": 8},
            named_specials={"image_token": "<image>"},
            prepend_bos=True,
        )
    },
)
