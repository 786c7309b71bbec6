"""PaliGemma (``PaliGemmaForConditionalGeneration``): SigLIP patches first, Gemma decoder, prefix-LM.

What the family needs that the others do not: the processor itself puts the image tokens first, then
``<bos>``, the question and a newline, so the prompt is the raw question (the study's code used no
``answer en`` task prefix even with the mix checkpoint; a template can add it and is recorded). The
image and prompt are a bidirectionally attended prefix (``token_type_ids`` 0), so a left-padded batch
must keep ``token_type_ids``; the processor's BC ``labels`` output is dropped. Gemma's RMSNorm scales by
``1 + weight`` (``norm_offset`` 1.0) and fp16 gives NaN logits (the study switched to bfloat16).
"""

from __future__ import annotations

from PIL import Image

from .base import Adapter, FamilySpec

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
    notes=(
        "raw question; processor adds <image>*N, <bos>, the question and '\\n'",
        "image tokens first; image + prompt prefix attended bidirectionally (token_type_ids)",
        "Gemma RMSNorm multiplies by (1 + weight): norm_offset 1.0",
        "processor returns BC 'labels': dropped so forward does not compute a loss",
    ),
)


class PaliGemmaAdapter(Adapter):
    """PaliGemma: the shared implementation; everything family-specific is in ``PALIGEMMA``."""

    spec = PALIGEMMA

    def _processed_ids(self, image: Image.Image, prompt: str, answer: str | None) -> list[int]:
        """PaliGemma's processor puts the answer (its ``suffix``) after the prompt's newline."""
        batch = self.processor(images=[image], text=[prompt], suffix=None if answer is None else [answer])
        return [int(i) for i in batch["input_ids"][0]]
