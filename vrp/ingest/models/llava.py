"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT patches, CLS dropped, Llama decoder.

What the family needs that the others do not: the image tokens equal the vision tower's patch grid only
with ``vision_feature_select_strategy="default"`` (the CLS feature is dropped); ``"full"`` keeps a CLS
token with no place on the grid, so ``encode`` refuses it. The processor may pad to square, resize the
shortest edge and centre-crop: the preprocessed image is the ``pixel_values`` size (336 x 336 for 1.5).
"""

from __future__ import annotations

from .base import Adapter, FamilySpec

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
