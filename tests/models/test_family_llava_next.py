"""LLaVA-NeXT: its anyres grids on the real checkpoint's config (meta device), and the tiny checkpoint.

The tiny checkpoint's capture, self-consistency, lens and evidence checks run in the parametrised
modules (test_capture, test_generate, test_evidence, e2e/test_interventions); this one holds what
only a multi-grid family has: masking through the tiles, a bright patch per grid, the lake rows.

The geometry numbers are worked by hand from transformers' own rules (``select_best_resolution``,
the processor's aspect-kept resize and centred pad, ``unpad_image``); ``encode`` itself checks them
against the image tokens the real processor inserted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_util import (
    assert_grid_and_stitched_maps,
    assert_meta_modules,
    assert_strategy_refused,
    bright_block_change,
    changed_pixels,
    ingest_multi_grid,
    meta_wrap,
    photo,
    random_image,
    tiny_checkpoint,
)
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    MistralConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from vrp.ingest.capture import capture_batch
from vrp.ingest.models.llava_next import LlavaNextAdapter, anyres_geometry
from vrp.ingest.models.tiny import tiny_tokenizer
from vrp.metrics.attention import cluster_count, spatial_entropy
from vrp.metrics.grids import stitch_attention

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
#: the checkpoint's prompt format, [INST] <image>\n question [/INST] (geometry does not depend on it)
MISTRAL_PROMPT = (
    "{% for message in messages %}[INST] {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %} [/INST]{% endfor %}"
)


@pytest.fixture(scope="module")
def mistral_7b() -> LlavaNextAdapter:
    """llava-hf/llava-v1.6-mistral-7b-hf's published sizes, on the meta device (nothing allocated)."""
    tokenizer = tiny_tokenizer("llava_next")
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
        chat_template=MISTRAL_PROMPT,
    )
    return meta_wrap(LlavaNextAdapter, model, processor)


def test_mistral_7b_modules_on_the_meta_device(mistral_7b):
    assert_meta_modules(
        mistral_7b, layers=32, hidden=4096, heads=32, kv_heads=8, norm="MistralRMSNorm", vocab=32064
    )


def test_672x336_is_a_global_view_plus_two_tiles_stitched_into_one_24x48_grid(mistral_7b):
    enc = mistral_7b.encode([photo(672, 336)], ["Is there a dog?"])
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
    enc = mistral_7b.encode([photo(640, 480)], ["Is there a dog?"])
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
    enc = mistral_7b.encode([photo(640, 480)], ["Is there a dog?"])
    layout = enc.layouts[0]
    raw = np.random.default_rng(0).random(layout.n_tokens)
    stitched = stitch_attention(raw, layout)
    assert stitched.shape == (36 * 48,)
    assert stitched.sum() == pytest.approx(1.0)
    assert (stitched.reshape(36, 48) > 0).all()  # every lattice cell of the photo gets attention


def test_full_strategy_is_refused(mistral_7b):
    assert_strategy_refused(mistral_7b, "full", "default")


# ----- the tiny checkpoint (32 px tiles read by 4 x 4 patches of 8 px; pinpoints 1x2, 2x1, 2x2) -----


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "llava_next")


def test_masking_greys_exactly_the_chosen_cells_through_the_tiles(tiny):
    adapter = tiny[1]
    rng = np.random.default_rng(0)
    images = [random_image(rng, 32, 64), random_image(rng, 32, 40)]
    enc = adapter.encode(images, ["Is there a red circle?", "Is there a star?"])
    # 64 x 32: best 32x64 = 1x2 tiles, nothing padded: a 4x8 high-res grid (flat ids 16..47).
    # 40 x 32: 1x2 tiles, the image 40 px wide pasted at x = 12; unpad keeps feature columns 1..6.
    assert [[(g.rows, g.cols) for g in layout.grids] for layout in enc.layouts] == [
        [(4, 4), (4, 8)],
        [(4, 4), (4, 6)],
    ]
    assert enc.inputs["pixel_values"].shape == (2, 3, 3, 32, 32)  # [B, global + 2 tiles, C, H, W]
    cells = [[5, 16 + 2 * 8 + 5, 16 + 3 * 8 + 3], [0, 16 + 0, 16 + 1 * 6 + 5]]
    expected = torch.zeros_like(enc.inputs["pixel_values"], dtype=torch.bool)
    expected[0, 0, :, 8:16, 8:16] = True  # global (1, 1)
    expected[0, 2, :, 16:24, 8:16] = True  # high-res (2, 5): feature column 5 = the 2nd tile's column 1
    expected[0, 1, :, 24:32, 24:32] = True  # high-res (3, 3): the 1st tile's column 3
    expected[1, 0, :, 0:8, 0:8] = True  # global (0, 0)
    expected[1, 1, :, 0:8, 8:16] = True  # high-res (0, 0): feature column 1 of the 1st tile
    expected[1, 2, :, 8:16, 16:24] = True  # high-res (1, 5): feature column 6 = the 2nd tile's column 2
    assert torch.equal(changed_pixels(adapter, enc, cells), expected)


def test_one_bright_patch_lights_its_cell_in_both_grids(tiny):
    """A bright 8 px block at (row 1, col 2) of a 32 px square changes the layer-0 evidence of global
    cell (1, 2) and high-res cell (1, 2) only (the square is pasted at x = 16 of the 1x2 canvas, so
    the block is the 2nd tile's column 0, the unpadded grid's column 2)."""
    change = bright_block_change(tiny[1], 32, slice(8, 16), slice(16, 24))
    assert [len(c) for c in change] == [16, 16]
    for grid in change:
        assert int(np.argmax(grid)) == 1 * 4 + 2, grid.reshape(4, 4)
        assert np.delete(grid, 6).max() < 1e-4 < grid[6]


def test_capture_keeps_each_grid_and_a_stitched_map_over_the_image(tiny):
    adapter = tiny[1]
    rng = np.random.default_rng(1)
    enc = adapter.encode([random_image(rng, 32, 64), random_image(rng, 48, 32)], ["Is there a star?"] * 2)
    cap = capture_batch(adapter, enc, ["yes", "no"], max_new_tokens=1)
    for b, layout in enumerate(enc.layouts):
        for layer in range(adapter.num_layers):
            grids = assert_grid_and_stitched_maps(cap, layout, b, layer)
            assert len(grids) == 2
            for grid, values in zip(layout.grids, grids, strict=True):  # per-map definitions, one by one
                assert values.entropy == pytest.approx(spatial_entropy(values.map), abs=1e-6)
                assert values.entropy_norm == pytest.approx(values.entropy / np.log(grid.size))
                assert values.clusters == cluster_count(values.map.reshape(grid.rows, grid.cols))
            # the grids' masses are the layer's image mass less the newline tokens' share
            assert sum(g.mass for g in grids) < cap.layers[b][layer]["image_mass"]


def test_vrp_ingest_run_writes_every_grid_and_the_stitched_map(tiny, shapes_workspace):
    root, data = shapes_workspace("llava-next-ingest", images=2, seed=3)
    ingest_multi_grid(tiny[0], data, root / "lake", n_grids=2)
