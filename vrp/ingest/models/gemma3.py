"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP patches pooled to a 16x16 grid, Gemma 3 decoder.

What the family needs that the others do not:

- **Grid.** The vision tower's patch grid (64x64 at 896 px / 14) is average-pooled in k x k blocks to
  ``mm_tokens_per_image`` tokens (256 = 16x16 for the released checkpoints), row-major, so one grid
  cell is a k*patch-pixel square (56 px) of the image the processor resized to ``image_size``.
- **Image token.** The prompt holds ``<start_of_image>`` (``processor.image_token``, and
  ``processor.image_token_id`` is its id); the processor expands it to ``\\n\\n<start_of_image>``, the
  256 ``<image_soft_token>`` tokens the model's ``image_token_id`` names, ``<end_of_image>\\n\\n``.
- **Mask.** Image tokens attend to each other bidirectionally inside their image block (the model
  builds the mask from ``token_type_ids`` 1 = image); text is causal. Generated tokens are text:
  ``token_type_ids`` 0 (PaliGemma's 1 would make them image tokens). Five of every six decoder
  layers attend within a sliding window; both masks are the model's own and reach VRP's attention
  functions as ordinary masks.
- **Norms.** Gemma's RMSNorm scales by ``1 + weight`` (``norm_offset`` 1.0), computed in float32.
  Each layer normalises its attention and MLP outputs before adding them to the residual stream, so
  the ``attn_out`` / ``mlp_out`` sites (and MLP edits) are those norms' outputs.
- **Prompt.** The checkpoint's chat template (user turn: image, then the question).
- **Pan-and-scan** (``do_pan_and_scan``) adds crops of the image, each with its own 256 tokens:
  several grids per image, which this adapter refuses with a message.
- **float16.** Gemma 3 in float16 gives empty or NaN output (transformers issue 36822; bfloat16
  works, the checkpoints are bfloat16), so float16 is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .base import Adapter, FamilySpec
from .family import Family, TinyRecipe

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BatchFeature, PreTrainedModel, PreTrainedTokenizerFast
    from transformers.processing_utils import ProcessorMixin

GEMMA3 = FamilySpec(
    family="gemma3",
    model_types=("gemma3",),
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    unembedding="lm_head",
    attn="self_attn",
    mlp="mlp",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    norm_offset=1.0,
    prefix_bidirectional=False,
    fp16_nan=True,
    fp16_reason=(
        "Gemma 3 gives empty or NaN output in float16 (transformers issue 36822; its checkpoints are "
        "bfloat16); use --dtype bfloat16 or float32"
    ),
    prompt_template=None,
    generated_token_types={"token_type_ids": 0},
    notes=(
        "chat template: user content [image, text], add_generation_prompt=True",
        "grid = sqrt(mm_tokens_per_image) per side (16x16); cell = image_size / 16 pixels (56 px at 896)",
        "image block attended bidirectionally (token_type_ids 1); generated tokens are text, type 0",
        "Gemma RMSNorm multiplies by (1 + weight): norm_offset 1.0",
        "attn_out / mlp_out: post_attention_layernorm / post_feedforward_layernorm (added to the residual)",
        "pan-and-scan (several crops per image) refused",
    ),
)


class Gemma3Adapter(Adapter):
    """Gemma 3: chat-template prompts, a pooled square grid, pan-and-scan refused."""

    spec = GEMMA3

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, **kwargs: Any) -> None:
        if getattr(processor.image_processor, "do_pan_and_scan", None):
            raise ValueError(
                "this Gemma 3 processor has do_pan_and_scan on: pan-and-scan adds image crops, each with "
                "its own grid, and VRP maps one grid per image for Gemma 3; set do_pan_and_scan to false "
                "in the checkpoint's preprocessor_config.json"
            )
        super().__init__(model, processor, **kwargs)

    def _batch_images(self, images: Sequence[Image.Image]) -> list[Any]:
        """One list per prompt: Gemma3Processor reads a flat list as several images of one prompt."""
        return [[image] for image in images]

    def _processor_image_token_id(self) -> int | None:
        """The id the processor expands into image tokens (its ``image_token_id`` is ``<start_of_image>``)."""
        return getattr(self.processor.tokenizer, "image_token_id", None)

    def _row_geometry(self, batch: BatchFeature, row: int) -> tuple[tuple[int, int], tuple[int, int]]:
        height, width = (int(s) for s in batch["pixel_values"].shape[-2:])
        side = math.isqrt(int(self.model.config.mm_tokens_per_image))
        if height % side or width % side:
            raise ValueError(f"a {height}x{width} image does not split into a {side}x{side} grid")
        return (height, width), (height // side, width // side)

    def _geometry_hint(self) -> str:
        return (
            "Gemma 3 gives mm_tokens_per_image tokens per image on a square grid; more tokens mean "
            "pan-and-scan crops or several images, which VRP does not map"
        )


GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
"""The tiny checkpoints' chat template: Gemma 3's turns (``<start_of_turn>user`` ... ``model``)."""


def _tiny(tokenizer: PreTrainedTokenizerFast, opts: dict[str, Any]) -> tuple[PreTrainedModel, ProcessorMixin]:
    """SigLIP tower, k x k average pool to a grid x grid token map, Gemma 3 decoder with a sliding window.

    The model's own initialisation zeroes the projector and every ``(1 + w)`` norm weight; both are
    drawn at random here so the image reaches the decoder and the norm offset matters in tests.
    """
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from .tiny import require_patch_multiple, text_kwargs, vision_kwargs

    require_patch_multiple(opts)
    size, patch, grid = opts["image_size"], opts["patch_size"], opts["grid"]
    if (size // patch) % grid:
        raise ValueError(f"{size // patch} patches per side do not pool evenly to a {grid}x{grid} grid")
    image_processor = Gemma3ImageProcessorPil(
        size={"height": size, "width": size},
        image_mean=opts["image_mean"],
        image_std=opts["image_std"],
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=grid * grid,
    )
    head_dim = opts["hidden_size"] // opts["num_heads"]
    text = {
        **text_kwargs(tokenizer, opts),
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": opts["sliding_window"],
        "layer_types": ["sliding_attention", "full_attention"] * (opts["num_layers"] // 2)
        + ["sliding_attention"] * (opts["num_layers"] % 2),
    }
    vision = SiglipVisionConfig(**vision_kwargs(opts), vision_use_head=False)
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=grid * grid,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        projector = model.model.multi_modal_projector.mm_input_projection_weight
        projector.normal_(0.0, projector.shape[0] ** -0.5)
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight") and "vision_tower" not in name:
                param.uniform_(-0.5, 0.5)
    return model, processor


FAMILY = Family(
    adapter=Gemma3Adapter,
    names={
        "gemma-3-4b-it": "google/gemma-3-4b-it",
        "gemma-3-12b-it": "google/gemma-3-12b-it",
        "gemma-3-27b-it": "google/gemma-3-27b-it",
        "gemma-3-4b-pt": "google/gemma-3-4b-pt",
    },
    tiny={
        "gemma3": TinyRecipe(
            specials=(
                "<pad>",
                "<eos>",
                "<bos>",
                "<unk>",
                "<start_of_turn>",
                "<end_of_turn>",
                "<start_of_image>",
                "<end_of_image>",
                "<image_soft_token>",
            ),
            roles={"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
            build=_tiny,
            # 32 px / 4 px patches = 8x8 patches pooled 2x2 to a 4x4 grid of 8 px cells; a window of 8
            # tokens is shorter than the prompt, so the sliding layers' masks bind in every test
            defaults={"image_size": 32, "patch_size": 4, "grid": 4, "sliding_window": 8},
            named_specials={
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>",
            },
            prepend_bos=True,
            words=("model",),
        )
    },
)
