"""LLaVA-NeXT: its anyres grids on the real checkpoint's config (meta device), and the tiny checkpoint.

The geometry numbers are worked by hand from transformers' own rules (``select_best_resolution``,
the processor's aspect-kept resize and centred pad, ``unpad_image``); ``encode`` itself checks them
against the image tokens the real processor inserted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    MistralConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from vrp.ingest.models.llava_next import LlavaNextAdapter, anyres_geometry
from vrp.ingest.models.tiny import tiny_tokenizer
from vrp.metrics.grids import stitch_attention

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _photo(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (90, 120, 150))


@pytest.fixture(scope="module")
def mistral_7b() -> LlavaNextAdapter:
    """llava-hf/llava-v1.6-mistral-7b-hf's published sizes, on the meta device (nothing allocated)."""
    tokenizer = tiny_tokenizer("llava")
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = MistralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32064,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=PINPOINTS,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return LlavaNextAdapter(
        model, processor, source="meta", name="meta", revision=None, dtype="float32", device="cpu"
    )


def test_mistral_7b_modules_on_the_meta_device(mistral_7b):
    adapter = mistral_7b
    assert (adapter.num_layers, adapter.hidden_size, adapter.num_heads, adapter.num_kv_heads) == (
        32,
        4096,
        32,
        8,
    )
    assert len(adapter.decoder_layers()) == 32
    assert type(adapter.final_norm()).__name__ == "MistralRMSNorm"
    assert adapter.unembedding().out_features == 32064
    assert all(p.is_meta for p in adapter.model.parameters())


def test_672x336_is_a_global_view_plus_two_tiles_stitched_into_one_24x48_grid(mistral_7b):
    enc = mistral_7b.encode([_photo(672, 336)], ["Is there a dog?"])
    layout = enc.layouts[0]
    # global view: 336/14 = 24 -> 24x24 = 576 tokens; best resolution 336x672 = 1x2 tiles, no padding,
    # so the high-res grid is 24 x 48 with a newline token after each of its 24 rows: 24*49 = 1176
    assert [(g.tile, g.rows, g.cols, g.is_global) for g in layout.grids] == [
        (0, 24, 24, True),
        (1, 24, 48, False),
    ]
    assert enc.image_pos[0].numel() == 576 + 24 * 49 == 1752
    assert layout.separators == 24 and layout.stitched == (24, 48) == enc.grids[0]
    assert enc.inputs["pixel_values"].shape == (1, 3, 3, 336, 336)  # global view + 2 tiles
    # the tokens: 576 global cells, then rows of 48 cells each followed by a newline token
    high = layout.grids[1].positions
    assert high[0] == 576 and high[47] == 623 and high[48] == 625
    assert layout.grids[1].image_box == pytest.approx((0, 0, 336, 672))


def test_a_640x480_photo_gets_2x2_tiles_unpadded_to_36_rows(mistral_7b):
    enc = mistral_7b.encode([_photo(640, 480)], ["Is there a dog?"])
    layout = enc.layouts[0]
    geometry = mistral_7b.anyres((480, 640))
    # best resolution 672x672 (2x2 tiles); resized to 504x672 and padded 84 px above and below;
    # unpad_image keeps 36 of the 48 feature rows (6 removed at top and bottom)
    assert geometry.tiles == (2, 2) and geometry.resized == (504, 672) and geometry.paste == (84, 0)
    assert geometry.unpadded == (6, 0, 36, 48)
    assert [(g.rows, g.cols) for g in layout.grids] == [(24, 24), (36, 48)]
    assert enc.image_pos[0].numel() == 576 + 36 * 49 == 2340
    assert enc.inputs["pixel_values"].shape == (1, 5, 3, 336, 336)
    # rows 6..41 of the 48 feature rows = canvas y 84..588, i.e. the whole photo (480 px high)
    high = layout.grids[1]
    assert (high.y_spans[0, 0], high.y_spans[-1, 1], high.x_spans[-1, 1]) == (84, 588, 672)
    assert layout.grids[1].image_box == pytest.approx((0, 0, 480, 640))


def test_anyres_geometry_matches_the_processor_token_count_for_many_shapes(mistral_7b):
    """The processor's own count (what it inserted) equals VRP's layout for tall, wide and odd images."""
    processor = mistral_7b.processor
    for width, height in [(100, 700), (1000, 200), (333, 334), (800, 600), (50, 50)]:
        geometry = anyres_geometry((height, width), PINPOINTS, 336, 14)
        rows, cols = geometry.grid
        count = processor._get_number_of_features(height, width, 336, 336) - 1  # CLS dropped
        assert count == 576 + rows * (cols + 1), (width, height)


def test_a_stitched_map_covers_the_image(mistral_7b):
    enc = mistral_7b.encode([_photo(640, 480)], ["Is there a dog?"])
    layout = enc.layouts[0]
    raw = np.random.default_rng(0).random(layout.n_tokens)
    stitched = stitch_attention(raw, layout)
    assert stitched.shape == (36 * 48,)
    assert stitched.sum() == pytest.approx(1.0)
    assert (stitched.reshape(36, 48) > 0).all()  # every lattice cell of the photo gets attention


def test_full_strategy_is_refused(mistral_7b):
    mistral_7b.model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match="'default'"):
            mistral_7b.encode([_photo(64, 64)], ["Is there a dog?"])
    finally:
        mistral_7b.model.config.vision_feature_select_strategy = "default"
