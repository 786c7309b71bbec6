"""LLaVA-OneVision: its anyres grids on the real 0.5B checkpoint's config (meta device), and the tiny one.

Numbers worked by hand from transformers' rules (``select_best_resolution`` over the 36 pinpoints,
``unpad_image``, the ``anyres_max_9`` shrink); ``encode`` checks them against the image tokens
the real processor inserted. The tiny checkpoint's capture, self-consistency, lens and evidence
checks run in the parametrised modules; this one holds what only a multi-grid family has.
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
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from vrp.ingest.capture import capture_batch
from vrp.ingest.models.llava_onevision import (
    TINY_CHAT_TEMPLATE,
    ImageOnlyLlavaOnevisionProcessor,
    LlavaOnevisionAdapter,
)
from vrp.ingest.models.tiny import tiny_tokenizer
from vrp.metrics.grids import cell_boxes, stitch_attention

PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


@pytest.fixture(scope="module")
def qwen2_0_5b() -> LlavaOnevisionAdapter:
    """llava-hf/llava-onevision-qwen2-0.5b-ov-hf's published sizes, on the meta device."""
    tokenizer = tiny_tokenizer("llava_onevision")
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        vision_use_head=False,
    )
    text = Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=152000,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    processor = ImageOnlyLlavaOnevisionProcessor(
        LlavaOnevisionImageProcessorPil(
            size={"height": 384, "width": 384},
            image_grid_pinpoints=PINPOINTS,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ),
        tokenizer,
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=TINY_CHAT_TEMPLATE,  # the checkpoints' Qwen2 turns
    )
    return meta_wrap(LlavaOnevisionAdapter, model, processor)


def test_qwen2_0_5b_modules_on_the_meta_device(qwen2_0_5b):
    assert_meta_modules(
        qwen2_0_5b, layers=24, hidden=896, heads=14, kv_heads=2, norm="Qwen2RMSNorm", vocab=152000
    )


def test_672x336_is_a_global_view_plus_two_tiles_in_one_27x54_grid(qwen2_0_5b):
    enc = qwen2_0_5b.encode([photo(672, 336)], ["Is there a dog?"])
    layout = enc.layouts[0]
    # SigLIP 384/14 -> 27x27 = 729 per view; best pinpoint 384x768 = 1x2 tiles, no padding, no shrink
    assert [(g.rows, g.cols) for g in layout.grids] == [(27, 27), (27, 54)]
    assert enc.image_pos[0].numel() == 729 + 27 * 55 == 2214
    assert enc.inputs["pixel_values"].shape == (1, 3, 3, 384, 384)
    # a tile is read as 27 x 14 = 378 px: the high-res grid's columns jump the 6 unread pixels
    high = layout.grids[1]
    assert high.x_spans[26].tolist() == [364, 378] and high.x_spans[27].tolist() == [384, 398]


def test_a_large_photo_is_shrunk_past_nine_tiles(qwen2_0_5b):
    enc = qwen2_0_5b.encode([photo(2000, 1500)], ["Is there a dog?"])
    layout = enc.layouts[0]
    geometry = qwen2_0_5b.anyres((1500, 2000))
    # best pinpoint 1536x2304 = 4x6 tiles -> 108x162 features, unpadded to 108x144 (9 columns each side);
    # 108*144 cells > 1.1^2 * 9 * 729, ratio sqrt(15552 / 6561) = 1.540, so 108//1.54 x 144//1.54 = 70 x 93
    assert geometry.tiles == (4, 6) and geometry.unpadded == (0, 9, 108, 144)
    assert [(g.rows, g.cols) for g in layout.grids] == [(27, 27), (70, 93)]
    assert enc.image_pos[0].numel() == 729 + 70 * 94
    stitched = stitch_attention(np.random.default_rng(0).random(layout.n_tokens), layout)
    assert stitched.sum() == pytest.approx(1.0) and (stitched > 0).all()
    # every cell of the shrunk grid has pixels, and the cells never overlap
    boxes = cell_boxes(layout.grids[1])
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    # the grid covers the photo up to unpad_image's rounding (whole feature cells: 2 px) and the 6 px
    # the tower never reads at the end of each tile (1530 of the canvas's 1536 rows: 1494 of 1500)
    y0, x0, y1, x1 = layout.grids[1].image_box
    assert (y0, x0, y1, x1) == pytest.approx((0, -1.95, 1494.14, 1996.09), abs=0.01)


def test_default_strategy_is_refused(qwen2_0_5b):
    assert_strategy_refused(qwen2_0_5b, "default", "full")


# ----- the tiny checkpoint: 36 px tiles read by 4 x 4 patches of 8 px (4 px unread), anyres_max_1 -----


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "llava_onevision")


def test_the_checkpoint_loads_without_a_video_processor(tiny):
    assert type(tiny[1].processor).__name__ == "ImageOnlyLlavaOnevisionProcessor"
    assert tiny[1].processor.vision_aspect_ratio == "anyres_max_1"
    assert tiny[1].prompt("Is there a star?").endswith("<|im_start|>assistant\n")


def test_masking_greys_exactly_the_chosen_cells_also_across_a_tile_border(tiny):
    adapter = tiny[1]
    rng = np.random.default_rng(0)
    images = [random_image(rng, 36, 36), random_image(rng, 36, 72)]
    enc = adapter.encode(images, ["Is there a red circle?", "Is there a star?"])
    # 36 x 36: 1x2 tiles, pasted at x = 18, unpad keeps feature columns 2..5 (4 of 8): 4x4, no shrink.
    # 72 x 36: 1x2 tiles, a 4x8 feature grid holding 2 tiles' worth of cells > 1.1^2 * 1 tile, so the
    # model shrinks it by sqrt(2) to 2x5: a cell spans 2 feature rows and 1.6 feature columns.
    assert [[(g.rows, g.cols) for g in layout.grids] for layout in enc.layouts] == [
        [(4, 4), (4, 4)],
        [(4, 4), (2, 5)],
    ]
    cells = [[16 + 1 * 4 + 2, 16 + 3 * 4 + 1], [3, 16 + 0 * 5 + 2]]
    expected = torch.zeros_like(enc.inputs["pixel_values"], dtype=torch.bool)
    expected[0, 2, :, 8:16, 0:8] = True  # high-res (1, 2): feature column 4 = the 2nd tile's column 0
    expected[0, 1, :, 24:32, 24:32] = True  # high-res (3, 1): feature column 3 = the 1st tile's column 3
    expected[1, 0, :, 0:8, 24:32] = True  # global (0, 3)
    # shrunk (0, 2): feature rows 0..2, columns 3.2..4.8 = canvas x 25.6..42.4 (the 1st tile's last
    # read pixels, its 4 unread ones, and the 2nd tile's first 6), rounded to whole pixels
    expected[1, 1, :, 0:16, 26:36] = True
    expected[1, 2, :, 0:16, 0:6] = True
    assert torch.equal(changed_pixels(adapter, enc, cells), expected)


def test_one_bright_patch_lights_its_cell_in_both_grids(tiny):
    """A bright block at original x 18..26, y 8..16 of a 36 px square: on the canvas (pasted at
    x = 18) it is exactly the 2nd tile's first patch column, high-res cell (1, 2); the global view
    (the square itself, 8 px cells) sees it straddle cells (1, 2) and (1, 3)."""
    change = bright_block_change(tiny[1], 36, slice(8, 16), slice(18, 26))
    assert sorted(np.flatnonzero(change[0] > 1e-4).tolist()) == [6, 7]  # global (1, 2) and (1, 3)
    assert np.flatnonzero(change[1] > 1e-4).tolist() == [6]  # high-res (1, 2)


def test_capture_keeps_each_grid_and_a_stitched_map_over_the_image(tiny):
    adapter = tiny[1]
    rng = np.random.default_rng(1)
    enc = adapter.encode([random_image(rng, 36, 72), random_image(rng, 50, 30)], ["Is there a star?"] * 2)
    cap = capture_batch(adapter, enc, ["yes", "no"], max_new_tokens=1)
    for b, layout in enumerate(enc.layouts):
        for layer in range(adapter.num_layers):
            assert len(assert_grid_and_stitched_maps(cap, layout, b, layer)) == 2


def test_vrp_ingest_run_writes_every_grid_and_the_stitched_map(tiny, shapes_workspace):
    root, data = shapes_workspace("llava-onevision-ingest", images=2, seed=3)
    ingest_multi_grid(tiny[0], data, root / "lake", n_grids=2)
