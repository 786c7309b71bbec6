"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres with a SigLIP tower.

What differs from LLaVA-NeXT (``llava_next.py``), read from transformers'
``LlavaOnevisionModel.pack_image_features`` and its processor:

- SigLIP has no CLS token: ``vision_feature_select_strategy`` is ``"full"`` and each tile gives
  ``num_image_tokens`` = S x S features (27 x 27 = 729 for 384 px / 14; the tower reads 378 of the
  384 pixels, so the last 6 pixel rows and columns of every tile belong to no cell).
- ``vision_aspect_ratio="anyres_max_N"``: when the unpadded high-res grid holds more than about N
  tiles' worth of cells (ratio > 1.1), the model shrinks it bilinearly to
  ``(rows // ratio) x (cols // ratio)`` before adding the newline tokens. A cell of that grid then
  covers a fractional block of feature cells, and masking greys the pixels of that block.
- The checkpoints' prompt is a Qwen2 chat template; the processor insists on a video processor,
  which needs torchvision, so without torchvision loading builds an image-only processor.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import transformers
from transformers import LlavaOnevisionProcessor
from transformers.processing_utils import ProcessorMixin

from .base import FamilySpec, auto_processor_or_none
from .family import Family, TinyRecipe
from .llava_next import Anyres, LlavaNextAdapter

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

LLAVA_ONEVISION = FamilySpec(
    family="llava_onevision",
    model_types=("llava_onevision",),
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
        "prompt: the checkpoint's chat template (user: image, text)",
        "grids: 0 = global view (S x S), 1 = the unpadded anyres grid (shrunk past anyres_max_N) with a "
        "newline token after each row",
        "needs vision_feature_select_strategy='full' (SigLIP has no CLS)",
    ),
)


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """A ``LlavaOnevisionProcessor`` without a video processor, for environments without torchvision.

    ``ProcessorMixin`` derives its required sub-processors from ``__init__``'s parameters, so this
    signature (image processor + tokenizer) is what makes the video processor optional; images and
    text go through the parent's unchanged code.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs: Any,
    ) -> None:
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def max_tiles(vision_aspect_ratio: str) -> int:
    """N of ``anyres_max_N`` (transformers strips the prefix's characters; the same for N's digits)."""
    return int(vision_aspect_ratio.removeprefix("anyres_max_"))


def shrunk_grid(geometry: Anyres, vision_aspect_ratio: str) -> tuple[int, int]:
    """The high-res grid after OneVision's bilinear shrink (``pack_image_features``), or as it was."""
    _top, _left, rows, cols = geometry.unpadded
    ratio = math.sqrt(rows * cols / (max_tiles(vision_aspect_ratio) * geometry.side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: LLaVA-NeXT's two grids, SigLIP tiles, the high-res grid shrunk past N tiles."""

    spec = LLAVA_ONEVISION

    def _high_res(self, geometry: Anyres) -> Anyres:
        ratio = getattr(self.model.config, "vision_aspect_ratio", "anyres_max_9")
        return replace(geometry, grid=shrunk_grid(geometry, ratio))

    def _check_strategy(self) -> None:
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "full")
        if strategy != "full":
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r}: OneVision's SigLIP tower has no CLS token, so "
                "'default' drops a real patch and the grids break; load the checkpoint with 'full'"
            )

    def _geometry_hint(self) -> str:
        return "the processor's image_grid_pinpoints / vision_aspect_ratio and the model config's disagree"

    @classmethod
    def load_processor(cls, source: str) -> tuple[ProcessorMixin, bool]:
        """``AutoProcessor``, or the image-only processor when torchvision (for video) is missing.

        Only a failure caused by the missing video processor falls back; any other error propagates.
        Without torchvision, transformers 5.24 fails while checking the video processor's class with
        an AttributeError naming ``VIDEO_PROCESSOR_MAPPING._extra_content``, hence that word too.
        """
        from .qwen2vl import _read_chat_template, _torchvision_missing

        processor = auto_processor_or_none(
            source,
            errors=(ImportError, OSError, ValueError, AttributeError),
            missing=_torchvision_missing,
            words=("video", "torchvision", "_extra_content"),
        )
        if processor is not None:
            return processor, False
        image_processor = transformers.AutoImageProcessor.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        settings = _processor_settings(source)
        chat_template = _read_chat_template(source) or getattr(tokenizer, "chat_template", None)
        processor = ImageOnlyLlavaOnevisionProcessor(
            image_processor, tokenizer, chat_template=chat_template, **settings
        )
        return processor, True


def _processor_settings(source: str) -> dict[str, Any]:
    """The processor's own settings saved beside the checkpoint (token count, strategy, aspect ratio)."""
    keys = (
        "num_image_tokens",
        "vision_feature_select_strategy",
        "vision_aspect_ratio",
        "image_token",
        "video_token",
    )
    path = Path(source)
    if not path.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "processor_config.json")
        path = Path(cached).parent if isinstance(cached, str) else path
    config = path / "processor_config.json"
    data = json.loads(config.read_text()) if config.is_file() else {}
    return {k: data[k] for k in keys if k in data}


def _stock_processor_files(out: Path, processor: Any) -> None:
    """Make the saved files name the stock processor class and carry a video-processor config.

    The tiny checkpoint is then what a hub checkpoint is: with torchvision ``AutoProcessor`` builds
    the full processor, without it ``load_processor`` builds the image-only one.
    """
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = out / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["processor_class"] = "LlavaOnevisionProcessor"
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    ip = processor.image_processor
    video = {
        "video_processor_type": "LlavaOnevisionVideoProcessor",
        "size": dict(ip.size),
        "image_mean": list(ip.image_mean),
        "image_std": list(ip.image_std),
        "processor_class": "LlavaOnevisionProcessor",
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")


#: the tiny checkpoints' chat template: Qwen2's turns, spelt with the word-level vocabulary
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny(tokenizer: PreTrainedTokenizerFast, opts: dict[str, Any]) -> tuple[PreTrainedModel, ProcessorMixin]:
    """SigLIP vision tower + Qwen2 decoder with anyres tiles of ``image_size`` pixels.

    ``anyres_max`` (default 1) makes a 2x2-tile image's grid shrink, so the tiny checkpoint
    exercises the resampled grid too.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from .llava_next import tiny_pinpoints
    from .tiny import text_kwargs, vision_kwargs

    size, patch = opts["image_size"], opts["patch_size"]
    pinpoints = tiny_pinpoints(size)
    aspect = f"anyres_max_{opts['anyres_max']}"
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size},
        image_grid_pinpoints=pinpoints,
        image_mean=opts["image_mean"],
        image_std=opts["image_std"],
    )
    side = size // patch
    processor = ImageOnlyLlavaOnevisionProcessor(
        image_processor,
        tokenizer,
        num_image_tokens=side * side,
        vision_feature_select_strategy="full",
        chat_template=TINY_CHAT_TEMPLATE,
        vision_aspect_ratio=aspect,
    )
    vision = SiglipVisionConfig(**vision_kwargs(opts), vision_use_head=False)
    text = text_kwargs(tokenizer, opts)
    text["bos_token_id"] = None
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**text),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


FAMILY = Family(
    adapter=LlavaOnevisionAdapter,
    names={
        "llava-onevision-qwen2-0.5b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        "llava-onevision-qwen2-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    },
    tiny={
        "llava_onevision": TinyRecipe(
            specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>"),
            roles={"unk_token": "<unk>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
            build=_tiny,
            # 36 px tiles read by 4 x 8 px patches (4 px unread, as SigLIP leaves 6 of 384), and a grid
            # shrunk past one tile's worth of cells, so both quirks run in the tests
            defaults={"image_size": 36, "patch_size": 8, "anyres_max": 1},
            after_save=_stock_processor_files,
        )
    },
)
