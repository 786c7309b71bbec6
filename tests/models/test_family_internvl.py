"""InternVL: the real checkpoint's dynamic tiles on the meta device, and the tiny checkpoint's grids.

The tiny checkpoint's capture (answer rows == eager attention, resid, lens), self-consistency and
evidence checks run in the parametrised modules (test_capture, test_generate, test_evidence,
e2e/test_interventions); this one holds what only a tiled family has: the documented token counts,
masking through the batch's flat tile tensor, a bright block in a tile and the thumbnail, the lake.

The numbers are worked by hand from transformers' own rules (``get_optimal_tiled_canvas``, the
stretch onto the tiled canvas, ``InternVLModel.pixel_shuffle``); ``encode`` itself checks them
against the image tokens the real processor inserted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_util import (
    assert_grid_and_stitched_maps,
    assert_legacy_chat_template_read,
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
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from vrp.ingest.capture import capture_batch
from vrp.ingest.models.internvl import ImageOnlyInternVLProcessor, InternVLAdapter, _torchvision_missing
from vrp.ingest.models.tiny import tiny_tokenizer
from vrp.metrics.grids import stitch_attention

CLIP_MEAN = [0.485, 0.456, 0.406]
CLIP_STD = [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def internvl3_1b() -> InternVLAdapter:
    """OpenGVLab/InternVL3-1B-hf's published sizes (InternViT-300M 448 px / 14 px patches, pixel shuffle
    0.5, Qwen2.5-0.5B decoder) on the meta device, with its processor (tiles of 448 px, at most 12)."""
    tokenizer = tiny_tokenizer("internvl")
    vision = InternVLVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=448,
        patch_size=14,
    )
    text = Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151674,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=256,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        crop_to_patches=False,  # as the checkpoint's file says; the processor turns it on for images
        min_patches=1,
        max_patches=12,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = ImageOnlyInternVLProcessor(image_processor, tokenizer, image_seq_length=256)
    return meta_wrap(
        InternVLAdapter,
        model,
        processor,
        prompt_template="<|im_start|>user\n{image}\n{question}<|im_end|>\n<|im_start|>assistant\n",
    )


def test_internvl3_1b_modules_on_the_meta_device(internvl3_1b):
    assert_meta_modules(
        internvl3_1b, layers=24, hidden=896, heads=14, kv_heads=2, norm="Qwen2RMSNorm", vocab=151674
    )


def test_a_640x480_photo_is_4x3_tiles_of_256_tokens_and_a_thumbnail(internvl3_1b):
    enc = internvl3_1b.encode([photo(640, 480)], ["Is there a dog?"])
    layout = enc.layouts[0]
    # aspect 4:3 is exactly the 4 x 3 arrangement (12 tiles, the maximum); each 448 px tile is
    # 32 x 32 patches of 14 px, pixel-shuffled to 16 x 16 = 256 tokens; the thumbnail comes last
    assert enc.inputs["pixel_values"].shape == (13, 3, 448, 448)
    assert enc.image_pos[0].numel() == 13 * 256 == 3328 == layout.n_tokens
    assert [(g.tile, g.rows, g.cols, g.is_global, g.view) for g in layout.grids] == [
        (0, 16, 16, True, 12),
        *[(1 + k, 16, 16, False, k) for k in range(12)],
    ]
    assert layout.stitched == (48, 64) == enc.grids[0] and layout.separators == 0
    assert layout.grids[0].positions[0] == 12 * 256 and layout.grids[6].positions[0] == 5 * 256
    # tile 5 = row 1, col 1 of 4 columns: the original's y 160..320, x 160..320
    assert layout.grids[6].image_box == pytest.approx((160, 160, 320, 320))
    # the image tokens are one run between <img> and </img>
    tokens = internvl3_1b.tokenizer.convert_ids_to_tokens(enc.inputs["input_ids"][0])
    first, last = int(enc.image_pos[0][0]), int(enc.image_pos[0][-1])
    assert (tokens[first - 1], tokens[last + 1], last - first + 1) == ("<img>", "</img>", 3328)


def test_a_square_photo_is_one_tile_without_a_thumbnail(internvl3_1b):
    enc = internvl3_1b.encode([photo(448, 448)], ["Is there a dog?"])
    # aspect 1: the 1x1 arrangement wins (2x2 ties but would cover more than twice the image's area)
    assert not enc.layouts[0].multi and enc.grids[0] == (16, 16) and enc.image_pos[0].numel() == 256
    assert enc.image_sizes[0] == (448, 448) and enc.cell_sizes[0] == (28, 28)


def test_max_patches_1_turns_the_tiles_off(internvl3_1b):
    ip = internvl3_1b.processor.image_processor
    ip.max_patches = 1
    try:
        enc = internvl3_1b.encode([photo(640, 480)], ["Is there a dog?"])
    finally:
        ip.max_patches = 12
    assert not enc.layouts[0].multi and enc.image_pos[0].numel() == 256


def test_tile_counts_match_the_processor_for_many_shapes(internvl3_1b):
    processor = internvl3_1b.processor
    for width, height in [(100, 700), (1000, 200), (333, 334), (50, 50), (2000, 1000), (640, 480)]:
        rows, cols = internvl3_1b.tiles((height, width))
        count = processor._get_num_multimodal_tokens([(height, width)])["num_image_tokens"][0]
        assert count == 2 + 256 * (rows * cols + (1 if rows * cols > 1 else 0)), (width, height)


def test_a_stitched_map_covers_the_image(internvl3_1b):
    enc = internvl3_1b.encode([photo(640, 480)], ["Is there a dog?"])
    layout = enc.layouts[0]
    stitched = stitch_attention(np.random.default_rng(0).random(layout.n_tokens), layout)
    assert stitched.shape == (48 * 64,) and stitched.sum() == pytest.approx(1.0)
    assert (stitched > 0).all()


def test_full_strategy_is_refused(internvl3_1b):
    assert_strategy_refused(internvl3_1b, "full", "default")


# ----- the tiny checkpoint (32 px tiles, 8x8 patches of 4 px shuffled 2x2: 4x4 cells of 8 px) -----


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "internvl")


def test_the_tiny_checkpoint_loads_the_image_only_processor_without_torchvision(tiny):
    adapter = tiny[1]
    assert type(adapter.model).__name__ == "InternVLForConditionalGeneration"
    assert adapter.settings["image_only_processor"] == (type(adapter.processor) is ImageOnlyInternVLProcessor)


def test_the_image_only_processor_reads_a_legacy_chat_template_json(tiny, tmp_path):
    """Hub checkpoints may keep the processor's template in chat_template.json, which the tokenizer
    does not read: the fallback processor must still render the checkpoint's own prompt."""
    if not _torchvision_missing():
        pytest.skip("torchvision is installed: AutoProcessor builds the full processor")
    assert_legacy_chat_template_read(InternVLAdapter, tiny, tmp_path)


def test_masking_greys_exactly_the_chosen_cells_through_the_flat_tiles(tiny):
    adapter = tiny[1]
    rng = np.random.default_rng(0)
    images = [random_image(rng, 64, 64), random_image(rng, 32, 32)]
    enc = adapter.encode(images, ["Is there a red circle?", "Is there a star?"])
    # 64 x 64: 2 x 2 tiles + thumbnail (tensors 0..4); 32 x 32: one tile (tensor 5), one grid
    assert [len(layout.grids) for layout in enc.layouts] == [5, 1]
    assert enc.inputs["pixel_values"].shape == (6, 3, 32, 32)
    cells = [[5, 16 + 0, 16 * 4 + 15], [6]]
    expected = torch.zeros_like(enc.inputs["pixel_values"], dtype=torch.bool)
    expected[4, :, 8:16, 8:16] = True  # thumbnail (1, 1): row 0's last tensor
    expected[0, :, 0:8, 0:8] = True  # tile (0, 0), cell (0, 0)
    expected[3, :, 24:32, 24:32] = True  # tile (1, 1), cell (3, 3)
    expected[5, :, 8:16, 16:24] = True  # row 1's one grid, cell (1, 2)
    assert torch.equal(changed_pixels(adapter, enc, cells), expected)


def test_one_bright_block_lights_its_cells_in_its_tile_and_the_thumbnail(tiny):
    """A 64 px image is cut into four 32 px tiles unresized; a bright 16 px block at y 16..32,
    x 32..48 is cells (2..3, 0..1) of tile (0, 1) and, squashed to the 32 px thumbnail, cell (1, 2)."""
    change = bright_block_change(tiny[1], 64, slice(16, 32), slice(32, 48))
    assert [len(c) for c in change] == [16] * 5
    lit = [2 * 4 + 0, 2 * 4 + 1, 3 * 4 + 0, 3 * 4 + 1]
    assert (change[2][lit] > 1e-4).all() and np.delete(change[2], lit).max() < 1e-4  # VRP grid 2 = tile 1
    for grid in (1, 3, 4):
        assert change[grid].max() < 1e-4
    # the thumbnail's bicubic resize rings a little into neighbouring cells: the block's cell dominates
    assert int(np.argmax(change[0])) == 1 * 4 + 2
    assert change[0][6] > 3 * np.delete(change[0], 6).max()


def test_capture_keeps_each_grid_and_a_stitched_map_over_the_image(tiny):
    adapter = tiny[1]
    rng = np.random.default_rng(1)
    enc = adapter.encode([random_image(rng, 64, 64), random_image(rng, 30, 64)], ["Is there a star?"] * 2)
    cap = capture_batch(adapter, enc, ["yes", "no"], max_new_tokens=1)
    for b, layout in enumerate(enc.layouts):
        assert layout.multi
        for layer in range(adapter.num_layers):
            grids = assert_grid_and_stitched_maps(cap, layout, b, layer)
            assert sum(g.mass for g in grids) == pytest.approx(cap.layers[b][layer]["image_mass"], rel=1e-5)


def test_vrp_ingest_run_writes_every_grid_and_the_stitched_map(tiny, shapes_workspace):
    root, data = shapes_workspace("internvl-ingest", images=2, seed=3)
    # shapes-POPE's 80 px squares: 2 x 2 tiles (the 1x1 tie loses: 80^2 > half of 4 tiles' area) + thumbnail
    ingest_multi_grid(tiny[0], data, root / "lake", n_grids=5)
