"""PaliGemma (``PaliGemmaForConditionalGeneration``): SigLIP patches first, Gemma decoder, prefix-LM.

What the family needs that the others do not: the processor itself puts the image tokens first, then
``<bos>``, the question and a newline, so the prompt is the raw question (the study's code used no
``answer en`` task prefix even with the mix checkpoint; a template can add it and is recorded). The
image and prompt are a bidirectionally attended prefix (``token_type_ids`` 0), so a left-padded batch
must keep ``token_type_ids``; the processor's BC ``labels`` output is dropped. Gemma's RMSNorm scales by
``1 + weight`` (``norm_offset`` 1.0) and fp16 gives NaN logits (the study switched to bfloat16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PIL import Image

from .base import Adapter, FamilySpec
from .family import Family, TinyRecipe, ToyRecipe

if TYPE_CHECKING:
    from transformers import BatchFeature, PreTrainedModel, PreTrainedTokenizerFast
    from transformers.processing_utils import ProcessorMixin

PALIGEMMA = FamilySpec(
    family="paligemma",
    model_types=("paligemma",),
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    unembedding="lm_head",
    attn="self_attn",
    mlp="mlp",
    norm_offset=1.0,
    prefix_bidirectional=True,
    fp16_nan=True,
    fp16_reason=(
        "PaliGemma (Gemma) produced NaN logits in float16 in the study's runs (its scripts switched to "
        "bfloat16); use --dtype bfloat16 or float32"
    ),
    prompt_template="{image}{question}",
    text_only=False,
    text_only_reason="PaliGemmaProcessor refuses a prompt without images (the image is the prefix).",
    image_first=True,
    drop_inputs=("labels",),
    generated_token_types={"token_type_ids": 1},
    notes=(
        "raw question; processor adds <image>*N, <bos>, the question and '\\n'",
        "image tokens first; image + prompt prefix attended bidirectionally (token_type_ids)",
        "Gemma RMSNorm multiplies by (1 + weight): norm_offset 1.0",
        "processor returns BC 'labels': dropped so forward does not compute a loss",
        "generated tokens are the causal suffix: token_type_ids 1 (what the processor's suffix= gives)",
    ),
)


class PaliGemmaAdapter(Adapter):
    """PaliGemma: the shared implementation; everything family-specific is in ``PALIGEMMA``."""

    spec = PALIGEMMA

    def processed(self, image: Image.Image, prompt: str, answer: str | None) -> BatchFeature:
        """PaliGemma's processor puts the answer (its ``suffix``) after the prompt's newline."""
        suffix = None if answer is None else [answer]
        return self.processor(images=[image], text=[prompt], suffix=suffix, return_tensors="pt")


def _tiny(tokenizer: PreTrainedTokenizerFast, opts: dict[str, Any]) -> tuple[PreTrainedModel, ProcessorMixin]:
    """SigLIP vision tower (no head) + Gemma decoder; the processor resizes straight to size x size."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from .tiny import require_patch_multiple, text_kwargs, vision_kwargs

    require_patch_multiple(opts)
    size, patch = opts["image_size"], opts["patch_size"]
    image_processor = SiglipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=opts["image_mean"], image_std=opts["image_std"]
    )
    image_processor.image_seq_length = (size // patch) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vision = SiglipVisionConfig(**vision_kwargs(opts), vision_use_head=False)
    text_args = text_kwargs(processor.tokenizer, opts)
    text_args["head_dim"] = opts["hidden_size"] // opts["num_heads"]
    text = GemmaConfig(**text_args)
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        vocab_size=text.vocab_size,
        projection_dim=opts["hidden_size"],
        hidden_size=opts["hidden_size"],
    )
    return PaliGemmaForConditionalGeneration(config), processor


FAMILY = Family(
    adapter=PaliGemmaAdapter,
    names={
        "paligemma-3b-mix-224": "google/paligemma-3b-mix-224",
        "paligemma-3b-pt-224": "google/paligemma-3b-pt-224",
    },
    tiny={
        "paligemma": TinyRecipe(
            specials=("<pad>", "<eos>", "<bos>", "<unk>", "<image>"),
            roles={"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
            build=_tiny,
            defaults={"image_size": 32, "patch_size": 8},
        )
    },
    toy=ToyRecipe(),
)
