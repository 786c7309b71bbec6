"""One adapter interface over the VLM families, driven by a declarative table of per-family facts.

What this module offers:

- ``FamilySpec``: the facts about one family as data (module paths, image-token attribute, Gemma's
  ``(1 + w)`` norm offset, PaliGemma's bidirectional prefix, fp16 refusal), in the spirit of pyvene's
  model mappings. Nothing in it is pipeline code.
- ``Encoded``: one batch ready for ``model(**enc.inputs)``, left padded, with per-row answer position,
  image-token positions, patch grid(s) (``layouts``: one grid, or a global view and tiles) and
  preprocessed image size.
- ``Adapter``: the shared implementation. A family subclass only declares its ``spec`` and, where the
  family differs, overrides ``_row_geometry`` (geometry), ``prompt`` (a family without a template
  uses the checkpoint's chat template), ``mask_pixels`` (its pixel layout), ``load_processor`` or
  ``_batch_images`` (processor quirks); the engine never branches on the family.

Image tokens are always located by the image-token id in ``input_ids`` (never by fixed offsets, the
defect of the study's own code), and every row is checked: its image-token count must equal the area
of the patch grid the family's geometry derives (for a family with several grids per image, their
cells plus its row separators), otherwise ``encode`` raises instead of mislabelling patches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image

from vrp.metrics.grids import Grid, Layout, cell_boxes, locate_cell

if TYPE_CHECKING:
    from transformers import BatchFeature
    from transformers.processing_utils import ProcessorMixin

__all__ = ["Adapter", "Encoded", "FamilySpec", "LayerRangeError", "resolve_layer"]

QUESTION_SLOT = "{question}"


class LayerRangeError(ValueError):
    """A layer number the model does not have (the message gives its layer count)."""


def resolve_layer(layer: int, num_layers: int) -> int:
    """A decoder layer index counted from 0; a negative one counts from the end (-1 is the last).

    The one place that reads a user's layer number: ``vrp ingest run --layers`` and every
    intervention's ``--layer(s)`` go through it (docs/ARCHITECTURE.md section 4).
    """
    index = layer + num_layers if layer < 0 else layer
    if not 0 <= index < num_layers:
        raise LayerRangeError(f"layer {layer} is out of range: the model has {num_layers} decoder layers")
    return index


@dataclass(frozen=True)
class FamilySpec:
    """Declarative per-family facts; module paths are dotted paths from the top model."""

    family: str
    model_types: tuple[str, ...]
    decoder_layers: str
    final_norm: str
    unembedding: str
    attn: str
    mlp: str
    norm_offset: float
    prefix_bidirectional: bool
    fp16_nan: bool
    fp16_reason: str = ""
    # whether the processor takes a prompt without an image (the `none` condition); why not, if not
    text_only: bool = True
    text_only_reason: str = ""
    image_token_attr: str = "image_token_id"
    prompt_template: str | None = None
    image_first: bool = False
    dynamic_resolution: bool = False
    drop_inputs: tuple[str, ...] = ()
    # per-row tensors the model keeps from prefill to decoding (M-RoPE deltas), by dotted path
    decode_state: tuple[str, ...] = ()
    # per-token inputs and the value a generated (or teacher-forced answer) token takes in them, as
    # transformers' own generate appends: PaliGemma's causal suffix is token type 1, Qwen2-VL's text is
    # multimodal type 0. Per family because the same input name means different things (Gemma 3 reads
    # token type 1 as image).
    generated_token_types: dict[str, int] = field(default_factory=dict)
    # the modules whose outputs the layer adds to the residual stream, when not ``attn`` / ``mlp``
    # themselves (Gemma 2/3 normalise both outputs first): the attn_out / mlp_out sites and MLP edits
    attn_out: str | None = None
    mlp_out: str | None = None
    # what separates the prompt from the answer in a teacher-forced sequence (LLaVA: "ASSISTANT: 2")
    answer_separator: str = ""
    notes: tuple[str, ...] = ()


@dataclass
class Encoded:
    """One encoded batch; every per-row list is indexed like the batch."""

    inputs: dict[str, torch.Tensor]
    answer_pos: torch.Tensor
    image_pos: list[torch.Tensor]
    grids: list[tuple[int, int]]
    image_sizes: list[tuple[int, int]]
    cell_sizes: list[tuple[int, int]] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    # per row: every patch grid of the image (global view first) and its stitched lattice, which is
    # also ``grids[row]``; one grid for single-grid families (docs/ARCHITECTURE.md section 4.1b)
    layouts: list[Layout] = field(default_factory=list)


def tiled_layout(
    rows: int, cols: int, side: int, tile: int, original_size: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int], Layout]:
    """A picture cut into ``rows x cols`` equal tiles, each resized to ``tile`` px and read as
    ``side x side`` cells, plus the whole picture squashed into one more tile (grid 0, its tokens
    after the tiles'): Idefics3's and InternVL's layout, shared so the two cannot drift apart.

    Returns the row's image size, the approximate cell size in original pixels and the layout;
    grid ``1 + k`` is tile ``k`` row-major, its box the tile's share of the original picture.
    """
    height, width = original_size
    per_tile = side * side
    canvas = (0.0, 0.0, float(tile), float(tile))
    whole = (0.0, 0.0, float(height), float(width))
    n_tiles = rows * cols
    grids = [
        Grid.uniform(
            0, side, side, np.arange(per_tile) + n_tiles * per_tile, n_tiles, canvas, whole, is_global=True
        )
    ]
    for k in range(n_tiles):
        r, c = divmod(k, cols)
        box = (r * height / rows, c * width / cols, (r + 1) * height / rows, (c + 1) * width / cols)
        grids.append(Grid.uniform(1 + k, side, side, np.arange(per_tile) + k * per_tile, k, canvas, box))
    layout = Layout(tuple(grids), (height, width), (rows * side, cols * side), (n_tiles + 1) * per_tile)
    approx = (max(1, round(height / (rows * side))), max(1, round(width / (cols * side))))
    return (height, width), approx, layout


def chosen_cell_boxes(
    layout: Layout, chosen: Sequence[int]
) -> Iterator[tuple[int, tuple[int, int, int, int]]]:
    """Each chosen cell (a flat id over the layout's grids) as its grid's index and its whole-pixel box
    ``(y0, x0, y1, x1)`` in that grid's view: the pixels a multi-grid family's masking greys."""
    boxes = [cell_boxes(g) for g in layout.grids]
    for flat in chosen:
        index, cell = locate_cell(layout, int(flat))
        y0, x0, y1, x1 = (int(v) for v in boxes[index][cell])
        yield index, (y0, x0, y1, x1)


def auto_processor_or_none(
    source: str,
    *,
    errors: tuple[type[Exception], ...],
    missing: Callable[[], bool],
    words: tuple[str, ...],
) -> ProcessorMixin | None:
    """``AutoProcessor.from_pretrained(source)``, or None when it failed only because an optional
    package its video side needs is absent (one of ``errors``, naming one of ``words``, while
    ``missing()``): the family then builds its image-only processor. Any other error propagates."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(source)
    except errors as err:
        message = str(err).lower()
        if not (missing() and any(w in message for w in words)):
            raise
    return None


def _resolve(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """``model.get_submodule`` with an error that names the family path that failed."""
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise AttributeError(
            f"module path {path!r} does not exist in {type(model).__name__}; the family table in "
            "vrp/ingest/models does not match this transformers version"
        ) from err


class Adapter:
    """Family-independent view of a loaded VLM.

    Usage::

        adapter = load_adapter("toy-llava")
        enc = adapter.encode([image], ["Is there a red circle in the image?"])
        logits = adapter.model(**enc.inputs).logits[torch.arange(1), enc.answer_pos]
    """

    spec: ClassVar[FamilySpec]

    def __init__(
        self,
        model: torch.nn.Module,
        processor: ProcessorMixin,
        *,
        source: str,
        name: str,
        revision: str | None,
        dtype: str,
        device: str,
        settings: dict[str, Any] | None = None,
        prompt_template: str | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        bos_id = self.tokenizer.bos_token_id
        self._tokenizer_adds_bos = bos_id is not None and self.tokenizer("x")["input_ids"][:1] == [bos_id]
        self.source = source
        self.name = name
        self.revision = revision
        self.dtype = dtype
        self.device = device
        self._template = prompt_template if prompt_template is not None else self.spec.prompt_template

        config = model.config
        text = config.get_text_config()
        self.image_token_id = int(getattr(config, self.spec.image_token_attr))
        processor_image_id = self._processor_image_token_id()
        if processor_image_id is not None and int(processor_image_id) != self.image_token_id:
            raise ValueError(
                f"processor image token id {processor_image_id} != model config {self.spec.image_token_attr} "
                f"{self.image_token_id}: the checkpoint's processor and model disagree"
            )
        self.num_layers = int(text.num_hidden_layers)
        self.hidden_size = int(text.hidden_size)
        self.num_heads = int(text.num_attention_heads)
        self.num_kv_heads = int(getattr(text, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or self.hidden_size // self.num_heads)
        self.vocab_size = int(text.vocab_size)
        self.settings: dict[str, Any] = {
            "family": self.spec.family,
            "prompt_template": self.prompt_template_record(),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "image_processor": self._image_processor_settings(),
            **(settings or {}),
        }

    # ----- prompts -----------------------------------------------------------------------------------
    def _processor_image_token_id(self) -> int | None:
        """The id the processor expands the image placeholder into (checked against the model config)."""
        return getattr(self.processor, "image_token_id", None)

    def prompt_template_record(self) -> str:
        """The prompt as recorded in the run config: the template with ``{question}`` left in.

        A family without a template (``FamilySpec.prompt_template`` None, no ``--prompt-template``)
        uses the checkpoint's chat template; the record is then that template rendered around
        ``{question}``.
        """
        if self._template is None:
            return self._chat(QUESTION_SLOT, image=True)
        return self._template

    def prompt(self, question: str) -> str:
        """The text handed to the processor for one question (image placeholder included)."""
        if self._template is None:
            return self._chat(question, image=True)
        image_token = getattr(self.processor, "image_token", "<image>")
        return self._template.replace("{image}", image_token).replace("{question}", question)

    def _chat(self, question: str, *, image: bool) -> str:
        """One user turn (the image, then the question) in the chat template, ready for the answer.

        A template that writes the BOS token itself, for a tokenizer that also prepends one, would
        give two; the rendered one is dropped then, so the ids are what the model was trained on.
        """
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        bos = self.tokenizer.bos_token
        if self._tokenizer_adds_bos and bos and text.startswith(bos):
            text = text[len(bos) :]
        return text

    def answer_ids(self, image: Image.Image, question: str, answer: str) -> list[int]:
        """The ids of `answer` as they follow the prompt in a teacher-forced sequence.

        The prompt alone and the prompt followed by the answer are both tokenised by the model's
        processor; the ids past their common prefix are the answer's, so a tokenizer that spells
        a word differently after the prompt (SentencePiece's "▁2") gives that spelling.
        """
        prompt = [int(i) for i in self.processed(image, self.prompt(question), None)["input_ids"][0]]
        full = [int(i) for i in self.processed(image, self.prompt(question), answer)["input_ids"][0]]
        start = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(prompt))
        ids = full[start:]
        if not ids:
            raise ValueError(f"the answer {answer!r} adds no token after the prompt")
        return ids

    def processed(self, image: Image.Image, prompt: str, answer: str | None) -> BatchFeature:
        """The processor's unpadded output for one prompt, `answer` appended as the family writes it.

        Here after the family's separator; also the reference for what an answer token's per-token
        inputs are (``FamilySpec.generated_token_types``).
        """
        text = prompt if answer is None else prompt + self.spec.answer_separator + answer
        return self.processor(images=[image], text=[text], return_tensors="pt")

    # ----- encoding ----------------------------------------------------------------------------------
    def encode(self, images: Sequence[Image.Image], questions: Sequence[str]) -> Encoded:
        """Process a batch with left padding and derive every per-row geometric fact from the ids."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        if not images:
            raise ValueError("encode needs at least one sample")
        prompts = [self.prompt(q) for q in questions]
        batch = self.processor(
            images=self._batch_images(images), text=prompts, padding=True, return_tensors="pt"
        )
        input_ids = batch["input_ids"]
        mask = batch["attention_mask"]
        positions = torch.arange(input_ids.shape[1])
        answer_pos = torch.where(mask.bool(), positions, -1).max(dim=1).values
        image_pos, grids, image_sizes, cell_sizes, layouts = [], [], [], [], []
        for row in range(input_ids.shape[0]):
            pos = torch.nonzero(input_ids[row] == self.image_token_id).flatten()
            image_size, cell, layout = self._row_layout(batch, row, (images[row].height, images[row].width))
            if pos.numel() != layout.n_tokens:
                shapes = " + ".join(f"{g.rows}x{g.cols}" for g in layout.grids)
                expected = f"grids {shapes}" if layout.multi else f"a {shapes} grid"
                if layout.separators:
                    expected += f" and {layout.separators} row separators"
                raise ValueError(
                    f"row {row}: {pos.numel()} image tokens but the {self.spec.family} geometry gives "
                    f"{expected}; {self._geometry_hint()}"
                )
            image_pos.append(pos)
            grids.append(layout.stitched)
            image_sizes.append(image_size)
            cell_sizes.append(cell)
            layouts.append(layout)
        inputs = self._model_inputs(batch)
        return Encoded(
            inputs=inputs,
            answer_pos=answer_pos.to(self.device),
            image_pos=image_pos,
            grids=grids,
            image_sizes=image_sizes,
            cell_sizes=cell_sizes,
            original_sizes=[(im.height, im.width) for im in images],
            prompts=prompts,
            layouts=layouts,
        )

    def _batch_images(self, images: Sequence[Image.Image]) -> list[Any]:
        """The images of a batch as the processor takes them: one per prompt, in order."""
        return list(images)

    def _model_inputs(self, batch: BatchFeature) -> dict[str, torch.Tensor]:
        """The processor's tensors the model takes, floats in the model's dtype, on its device."""
        model_dtype = next(self.model.parameters()).dtype
        inputs: dict[str, torch.Tensor] = {}
        for key, value in batch.items():
            if key in self.spec.drop_inputs or not isinstance(value, torch.Tensor):
                continue
            if value.is_floating_point():
                value = value.to(model_dtype)
            inputs[key] = value.to(self.device)
        return inputs

    def text_prompt(self, question: str) -> str:
        """The prompt of one question without its image: the template with the image slot removed."""
        if self._template is None:
            return self._chat(question, image=False)
        return self._template.replace("{image}\n", "").replace("{image}", "").replace("{question}", question)

    def encode_text(self, questions: Sequence[str]) -> Encoded:
        """A text-only batch (the ``none`` condition): no image tokens, so no grid and no attention maps."""
        if not self.spec.text_only:
            raise ValueError(
                f"{self.spec.family} needs an image with every prompt: {self.spec.text_only_reason}"
            )
        if not questions:
            raise ValueError("encode_text needs at least one question")
        prompts = [self.text_prompt(q) for q in questions]
        batch = self.processor(text=prompts, padding=True, return_tensors="pt")
        mask = batch["attention_mask"]
        positions = torch.arange(mask.shape[1])
        answer_pos = torch.where(mask.bool(), positions, -1).max(dim=1).values
        if (batch["input_ids"] == self.image_token_id).any():
            raise ValueError("a text-only prompt still holds image tokens; check the prompt template")
        rows = len(prompts)
        return Encoded(
            inputs=self._model_inputs(batch),
            answer_pos=answer_pos.to(self.device),
            image_pos=[torch.zeros(0, dtype=torch.long) for _ in range(rows)],
            grids=[(0, 0)] * rows,
            image_sizes=[(0, 0)] * rows,
            cell_sizes=[(0, 0)] * rows,
            original_sizes=[(0, 0)] * rows,
            prompts=prompts,
        )

    def model_views(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """Each image as the model sees it: [H, W, 3] uint8 after the processor's resize and crop.

        The processor's own pipeline with rescaling and normalisation switched off, so the picture
        lines up with the patch grid (H x W = grid x cell) and the viewer can draw maps over it.
        """
        out = self.processor.image_processor(
            images=list(images), do_rescale=False, do_normalize=False, return_tensors="np"
        )
        return [
            np.clip(np.rint(self._view_pixels(out, row)), 0, 255).astype(np.uint8).transpose(1, 2, 0)
            for row in range(len(images))
        ]

    def _view_pixels(self, processed: BatchFeature, row: int) -> np.ndarray:
        """[3, H, W] float pixels of one image in the image processor's output."""
        return np.asarray(processed["pixel_values"][row], dtype=np.float32)

    def _row_layout(
        self, batch: BatchFeature, row: int, original_size: tuple[int, int]
    ) -> tuple[tuple[int, int], tuple[int, int], Layout]:
        """(preprocessed image (h, w), grid cell (h, w), every grid of the row's image).

        The default is one grid from :meth:`_row_geometry`. A family that shows the model several
        grids per image (a global view and tiles) overrides this and returns its
        :class:`~vrp.metrics.grids.Layout`; the first two values then describe the stitched
        lattice over the original image.
        """
        image_size, cell = self._row_geometry(batch, row)
        grid = (image_size[0] // cell[0], image_size[1] // cell[1])
        return image_size, cell, Layout.single(*grid, image_size)

    def _row_geometry(self, batch: BatchFeature, row: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(preprocessed image (h, w), grid cell (h, w)) in pixels; fixed-resolution default.

        One image token per vision patch: the cell is the vision tower's patch and the image is the
        ``pixel_values`` tensor's spatial size (so any resize or crop the processor did is accounted for).
        """
        height, width = batch["pixel_values"].shape[-2:]
        patch = int(self.model.config.vision_config.patch_size)
        return (int(height), int(width)), (patch, patch)

    def _geometry_hint(self) -> str:
        return "the processor and model config disagree on the image token count"

    def mask_pixels(
        self, pixels: torch.Tensor, enc: Encoded, cells: Sequence[Sequence[int]], grey: torch.Tensor
    ) -> torch.Tensor:
        """Set every pixel of ``cells[row]`` to ``grey`` (per channel) in ``pixels``, in place.

        ``pixels`` is a copy of ``enc.inputs["pixel_values"]``; this default is the image layout
        ``[B, C, H, W]``, where a cell is its :meth:`patch_box`. A family whose processor lays pixels
        out differently overrides it (Qwen2-VL's flattened patches).
        """
        if pixels.dim() != 4:
            raise ValueError(f"unsupported pixel_values layout {tuple(pixels.shape)}")
        for row, chosen in enumerate(cells):
            for cell in chosen:
                x0, y0, x1, y1 = self.patch_box(enc, row, cell)
                pixels[row, :, y0:y1, x0:x1] = grey[:, None, None]
        return pixels

    @classmethod
    def load_processor(cls, source: str) -> tuple[ProcessorMixin, bool]:
        """(processor, built_image_only) of a checkpoint: ``AutoProcessor`` unless the family differs."""
        import transformers

        return transformers.AutoProcessor.from_pretrained(source), False

    # ----- geometry ----------------------------------------------------------------------------------
    @staticmethod
    def _one_grid(enc: Encoded, row: int) -> None:
        """Refuse a single-grid question about an image the model saw as several grids."""
        if enc.layouts and enc.layouts[row].multi:
            raise ValueError(
                f"row {row} was seen as {len(enc.layouts[row].grids)} grids: its cells have no single "
                "preprocessed image; use enc.layouts[row] (vrp.metrics.grids)"
            )

    def cell_of(self, enc: Encoded, row: int, position: int) -> int:
        """Grid cell (row-major index) of the image token at sequence ``position`` of batch row ``row``."""
        hits = torch.nonzero(enc.image_pos[row] == position).flatten()
        if hits.numel() != 1:
            raise ValueError(f"position {position} of row {row} is not an image token")
        return int(hits[0])

    def position_of(self, enc: Encoded, row: int, cell: int) -> int:
        """Sequence position of grid cell ``cell`` (row-major) in batch row ``row``."""
        return int(enc.image_pos[row][cell])

    def patch_box(self, enc: Encoded, row: int, cell: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), end-exclusive, of grid cell ``cell`` in the preprocessed image's pixels."""
        self._one_grid(enc, row)
        grid_h, grid_w = enc.grids[row]
        if not 0 <= cell < grid_h * grid_w:
            raise IndexError(f"cell {cell} outside the {grid_h}x{grid_w} grid")
        r, c = divmod(cell, grid_w)
        cell_h, cell_w = enc.cell_sizes[row]
        return (c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h)

    def cell_at(self, enc: Encoded, row: int, x: float, y: float) -> int:
        """Row-major grid cell that contains preprocessed pixel (x, y)."""
        self._one_grid(enc, row)
        cell_h, cell_w = enc.cell_sizes[row]
        grid_h, grid_w = enc.grids[row]
        r, c = int(y // cell_h), int(x // cell_w)
        if not (0 <= r < grid_h and 0 <= c < grid_w):
            raise IndexError(f"pixel ({x}, {y}) outside the preprocessed {enc.image_sizes[row]} image")
        return r * grid_w + c

    def pixel_box_to_original(
        self, enc: Encoded, row: int, box: tuple[float, float, float, float]
    ) -> tuple[int, int, int, int]:
        """Map a preprocessed-pixel box back to the original image's pixels (clipped, outward-rounded).

        Used to mask patches in the image a user sees: grey out the returned box, re-process, and the
        processor's own resize/crop lands the grey on the same patch.
        """
        orig_h, orig_w = enc.original_sizes[row]
        scale_y, scale_x, off_y, off_x = self._to_preprocessed(orig_h, orig_w, enc.image_sizes[row])
        x0, y0, x1, y1 = box
        ox0 = (x0 + off_x) / scale_x
        oy0 = (y0 + off_y) / scale_y
        ox1 = (x1 + off_x) / scale_x
        oy1 = (y1 + off_y) / scale_y
        return (
            max(0, int(ox0)),
            max(0, int(oy0)),
            min(orig_w, int(-(-ox1 // 1))),
            min(orig_h, int(-(-oy1 // 1))),
        )

    def _to_preprocessed(
        self, orig_h: int, orig_w: int, final: tuple[int, int]
    ) -> tuple[float, float, float, float]:
        """(scale_y, scale_x, crop_top, crop_left): preprocessed = original * scale - crop offset.

        Reads the image processor's own settings: optional pad-to-square (LLaVA's image processor),
        resize (shortest edge, or straight to height x width), and optional centre crop.
        """
        ip = self.processor.image_processor
        pad_y = pad_x = 0.0
        h, w = float(orig_h), float(orig_w)
        if getattr(ip, "do_pad", False) and hasattr(ip, "pad_to_square"):
            side = max(h, w)
            pad_y, pad_x = (side - h) // 2, (side - w) // 2
            h = w = side
        size = dict(getattr(ip, "size", None) or {})
        if getattr(ip, "do_resize", True) and size.get("shortest_edge") and not size.get("longest_edge"):
            short = int(size["shortest_edge"])
            if h <= w:
                new_h, new_w = short, int(short * w / h)
            else:
                new_h, new_w = int(short * h / w), short
        else:
            new_h, new_w = final
        scale_y, scale_x = new_h / h, new_w / w
        top = left = 0.0
        crop = dict(getattr(ip, "crop_size", None) or {})
        if getattr(ip, "do_center_crop", False) and crop:
            top = int((new_h - int(crop["height"])) / 2.0)
            left = int((new_w - int(crop["width"])) / 2.0)
        return scale_y, scale_x, top - pad_y * scale_y, left - pad_x * scale_x

    def _image_processor_settings(self) -> dict[str, Any]:
        """The image-processor settings that change pixels or the grid (hashed into the run id)."""
        ip = self.processor.image_processor
        keys = (
            "size",
            "crop_size",
            "do_center_crop",
            "do_pad",
            "do_resize",
            "resample",
            "image_mean",
            "image_std",
            "patch_size",
            "merge_size",
            "temporal_patch_size",
            "image_seq_length",
        )
        out: dict[str, Any] = {"class": type(ip).__name__}
        for key in keys:
            value = getattr(ip, key, None)
            if value is None:
                continue
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            if hasattr(value, "items"):
                value = {k: v for k, v in dict(value).items() if v is not None}
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value if isinstance(value, (int, float, str, bool, list, dict)) else str(value)
        return out

    # ----- modules -----------------------------------------------------------------------------------
    def decoder_layers(self) -> list[torch.nn.Module]:
        return list(_resolve(self.model, self.spec.decoder_layers))

    def final_norm(self) -> torch.nn.Module:
        return _resolve(self.model, self.spec.final_norm)

    def final_norm_scale(self) -> torch.Tensor:
        """The final norm's effective per-coordinate scale in float32 (weight + the family's offset)."""
        return self.final_norm().weight.detach().float() + self.spec.norm_offset

    def unembedding(self) -> torch.nn.Module:
        return _resolve(self.model, self.spec.unembedding)

    def attn(self, layer: int) -> torch.nn.Module:
        return _resolve(self.decoder_layers()[layer], self.spec.attn)

    def mlp(self, layer: int) -> torch.nn.Module:
        return _resolve(self.decoder_layers()[layer], self.spec.mlp)

    def attn_out(self, layer: int) -> torch.nn.Module:
        """The module whose output the layer adds to the residual stream for its attention."""
        return _resolve(self.decoder_layers()[layer], self.spec.attn_out or self.spec.attn)

    def mlp_out(self, layer: int) -> torch.nn.Module:
        """The module whose output the layer adds to the residual stream for its MLP."""
        return _resolve(self.decoder_layers()[layer], self.spec.mlp_out or self.spec.mlp)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, source={self.source!r}, layers={self.num_layers}, "
            f"hidden={self.hidden_size}, dtype={self.dtype}, device={self.device})"
        )
