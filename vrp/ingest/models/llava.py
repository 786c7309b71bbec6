"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT patches, CLS dropped, Llama decoder.

What the family needs that the others do not: the image tokens equal the vision tower's patch grid only
with ``vision_feature_select_strategy="default"`` (the CLS feature is dropped); ``"full"`` keeps a CLS
token with no place on the grid, so ``encode`` refuses it. The processor may pad to square, resize the
shortest edge and centre-crop: the preprocessed image is the ``pixel_values`` size (336 x 336 for 1.5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Adapter, FamilySpec
from .family import Family, TinyRecipe, ToyRecipe

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast
    from transformers.processing_utils import ProcessorMixin

LLAVA = FamilySpec(
    family="llava",
    model_types=("llava",),
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    unembedding="lm_head",
    attn="self_attn",
    mlp="mlp",
    norm_offset=0.0,
    prefix_bidirectional=False,
    fp16_nan=False,
    prompt_template="USER: {image}\n{question}\nASSISTANT:",
    answer_separator=" ",
    notes=(
        "prompt 'USER: <image>\\n{question}\\nASSISTANT:' as in the study's code",
        "grid = pixel_values / vision patch (24x24 for 336/14); needs "
        "vision_feature_select_strategy='default' (CLS dropped), else the CLS token has no grid cell",
    ),
)


class LlavaAdapter(Adapter):
    """LLaVA-1.5: the shared implementation plus a CLS-aware error message."""

    spec = LLAVA

    def _geometry_hint(self) -> str:
        strategy = getattr(self.model.config, "vision_feature_select_strategy", None)
        return (
            f"vision_feature_select_strategy={strategy!r}; VRP maps image tokens to patches only for "
            "'default' (CLS dropped)"
        )


def _tiny(tokenizer: PreTrainedTokenizerFast, opts: dict[str, Any]) -> tuple[PreTrainedModel, ProcessorMixin]:
    """CLIP vision tower + Llama decoder; the processor pads nothing, resizes and centre-crops to size."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from .tiny import require_patch_multiple, text_kwargs, vision_kwargs

    require_patch_multiple(opts)
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
    vision = CLIPVisionConfig(**vision_kwargs(opts), projection_dim=opts["vision_hidden_size"])
    text = LlamaConfig(**text_kwargs(tokenizer, opts))
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(size // patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config), processor


FAMILY = Family(
    adapter=LlavaAdapter,
    names={"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf", "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf"},
    tiny={
        "llava": TinyRecipe(
            specials=("<unk>", "<s>", "</s>", "<pad>", "<image>"),
            roles={"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
            build=_tiny,
            defaults={"image_size": 32, "patch_size": 8},
            named_specials={"image_token": "<image>"},
            prepend_bos=True,
        )
    },
    toy=ToyRecipe(),
)
