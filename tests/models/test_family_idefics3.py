"""Idefics3 / SmolVLM: the real checkpoints' tiles on the meta device, and the tiny checkpoint's grids.

The tiny checkpoint's capture (answer rows == eager attention, resid, lens), self-consistency and
evidence checks run in the parametrised modules (test_capture, test_generate, test_evidence,
e2e/test_interventions); this one holds what only a tiled family has: the documented token counts,
masking through the tiles, a bright patch in a tile and in the global view, the lake rows.

The numbers are worked by hand from transformers' own rules (the image processor's longest-edge
resize, the stretch to whole tiles, ``Idefics3Connector.pixel_shuffle``); ``encode`` itself checks
them against the image tokens the real processor inserted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_util import (
    assert_grid_and_stitched_maps,
    assert_meta_modules,
    bright_block_change,
    changed_pixels,
    ingest_multi_grid,
    meta_wrap,
    photo,
    random_image,
    tiny_checkpoint,
)
from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from vrp.ingest.capture import capture_batch
from vrp.ingest.models.idefics3 import Idefics3Adapter
from vrp.ingest.models.tiny import tiny_tokenizer
from vrp.metrics.grids import stitch_attention


def _meta_adapter(vision: dict, text: dict, scale: int, tile: int, longest: int) -> Idefics3Adapter:
    """A published checkpoint's sizes on the meta device (nothing allocated), with its processor."""
    tokenizer = tiny_tokenizer("idefics3")
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**vision),
        text_config=LlamaConfig(**text),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(config)
    processor = Idefics3Processor(
        Idefics3ImageProcessorPil(
            size={"longest_edge": longest},
            max_image_size={"longest_edge": tile},
            do_image_splitting=True,
        ),
        tokenizer,
        image_seq_len=(tile // vision["patch_size"] // scale) ** 2,
    )
    return meta_wrap(
        Idefics3Adapter,
        model,
        processor,
        prompt_template="User:{image}{question}<end_of_utterance>\nAssistant:",
    )


@pytest.fixture(scope="module")
def smolvlm_256m() -> Idefics3Adapter:
    """HuggingFaceTB/SmolVLM-256M-Instruct: SigLIP 512 px / 16 px patches, shuffle 4, SmolLM2 decoder."""
    vision = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 512,
        "patch_size": 16,
    }
    text = {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49280,
    }
    return _meta_adapter(vision, text, scale=4, tile=512, longest=2048)


@pytest.fixture(scope="module")
def idefics3_8b() -> Idefics3Adapter:
    """HuggingFaceM4/Idefics3-8B-Llama3: SigLIP 364 px / 14 px patches, pixel shuffle 2, Llama 3 8B."""
    vision = {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 364,
        "patch_size": 14,
    }
    text = {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128259,
    }
    return _meta_adapter(vision, text, scale=2, tile=364, longest=4 * 364)


def test_smolvlm_256m_modules_on_the_meta_device(smolvlm_256m):
    assert_meta_modules(
        smolvlm_256m, layers=30, hidden=576, heads=9, kv_heads=3, norm="LlamaRMSNorm", vocab=49280
    )


def test_smolvlm_256m_reads_a_640x480_photo_as_3x4_tiles_of_64_tokens_and_a_global_view(smolvlm_256m):
    enc = smolvlm_256m.encode([photo(640, 480)], ["Is there a dog?"])
    layout = enc.layouts[0]
    # longest edge to 2048: 2048 x int(2048 / (4/3)) = 1536, already whole 512 px tiles: 3 rows x 4 cols;
    # each tile 512/16 = 32 patches a side, pixel-shuffled by 4: 8 x 8 = 64 tokens; + the global view
    assert enc.inputs["pixel_values"].shape == (1, 13, 3, 512, 512)
    assert enc.image_pos[0].numel() == 13 * 64 == 832 == layout.n_tokens
    assert [(g.tile, g.rows, g.cols, g.is_global, g.view) for g in layout.grids] == [
        (0, 8, 8, True, 12),
        *[(1 + k, 8, 8, False, k) for k in range(12)],
    ]
    assert layout.stitched == (24, 32) == enc.grids[0] and layout.separators == 0
    # the global view is the last 64 image tokens, tile k the k-th run of 64
    assert layout.grids[0].positions[0] == 768 and layout.grids[5].positions[0] == 4 * 64
    # tile (row 1, col 2) = the 7th tile covers the original's y 160..320, x 320..480
    assert layout.grids[7].image_box == pytest.approx((160, 320, 320, 480))
    assert layout.grids[0].image_box == pytest.approx((0, 0, 480, 640))
    # text tokens (<fake_token_around_image>, <row_r_col_c>, newlines) sit between the tiles: 12 tile
    # headers of 2 tokens, 3 row newlines, the global view's newline + 2 header tokens and closing token
    first, last = int(enc.image_pos[0][0]), int(enc.image_pos[0][-1])
    assert last - first + 1 == 832 + 2 * 11 + 3 + 1 + 2


def test_without_image_splitting_smolvlm_256m_sees_one_8x8_grid(smolvlm_256m):
    ip = smolvlm_256m.processor.image_processor
    ip.do_image_splitting = False
    try:
        enc = smolvlm_256m.encode([photo(640, 480)], ["Is there a dog?"])
    finally:
        ip.do_image_splitting = True
    layout = enc.layouts[0]
    assert not layout.multi and enc.grids[0] == (8, 8) and enc.image_pos[0].numel() == 64
    assert enc.image_sizes[0] == (512, 512) and enc.cell_sizes[0] == (64, 64)  # 4 x 16 px per token


def test_idefics3_8b_reads_a_640x480_photo_as_3x4_tiles_of_169_tokens(idefics3_8b):
    enc = idefics3_8b.encode([photo(640, 480)], ["Is there a dog?"])
    layout = enc.layouts[0]
    # longest edge to 1456: 1456 x 1092, whole 364 px tiles: 3 x 4; 364/14 = 26 patches, shuffled by 2: 13x13
    assert enc.inputs["pixel_values"].shape == (1, 13, 3, 364, 364)
    assert enc.image_pos[0].numel() == 13 * 169 == 2197
    assert [(g.rows, g.cols) for g in layout.grids] == [(13, 13)] * 13
    assert layout.stitched == (39, 52)


def test_tile_counts_match_the_processor_for_many_shapes(smolvlm_256m):
    """VRP's layout and the processor's own count agree for tall, wide, tiny and square images."""
    processor = smolvlm_256m.processor
    for width, height in [(100, 700), (1000, 200), (333, 334), (50, 50), (2000, 1000)]:
        rows, cols = smolvlm_256m.splits((height, width))
        count = processor._get_num_multimodal_tokens([(height, width)])["num_image_patches"][0]
        assert count == (rows * cols + 1 if rows else 1), (width, height)


def test_a_stitched_map_covers_the_image(smolvlm_256m):
    enc = smolvlm_256m.encode([photo(640, 480)], ["Is there a dog?"])
    layout = enc.layouts[0]
    stitched = stitch_attention(np.random.default_rng(0).random(layout.n_tokens), layout)
    assert stitched.shape == (24 * 32,) and stitched.sum() == pytest.approx(1.0)
    assert (stitched > 0).all()


# ----- the tiny checkpoint (32 px tiles, 8x8 patches of 4 px shuffled by 2: 4x4 cells of 8 px) -----


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "idefics3")


def test_masking_greys_exactly_the_chosen_cells_through_the_tiles(tiny):
    adapter = tiny[1]
    rng = np.random.default_rng(0)
    images = [random_image(rng, 64, 64), random_image(rng, 64, 32)]
    enc = adapter.encode(images, ["Is there a red circle?", "Is there a star?"])
    # 64 x 64: 2 x 2 tiles + global (5 grids of 16 cells); 64 high x 32 wide: 2 x 1 tiles + global
    assert [len(layout.grids) for layout in enc.layouts] == [5, 3]
    assert enc.inputs["pixel_values"].shape == (2, 5, 3, 32, 32)  # row 1's last two tiles are padding
    cells = [[5, 16 * 2 + 0, 16 * 4 + 15], [16 * 1 + 6, 16 * 2 + 9]]
    expected = torch.zeros_like(enc.inputs["pixel_values"], dtype=torch.bool)
    expected[0, 4, :, 8:16, 8:16] = True  # global view (1, 1): the last tensor
    expected[0, 1, :, 0:8, 0:8] = True  # tile (0, 1), cell (0, 0)
    expected[0, 3, :, 24:32, 24:32] = True  # tile (1, 1), cell (3, 3)
    expected[1, 0, :, 8:16, 16:24] = True  # tile (0, 0), cell (1, 2)
    expected[1, 1, :, 16:24, 8:16] = True  # tile (1, 0), cell (2, 1)
    assert torch.equal(changed_pixels(adapter, enc, cells), expected)


def test_a_wholly_masked_tile_still_reaches_the_model(tiny):
    """Idefics3 drops tiles whose every value is 0.0 as batch padding; VRP's grey is RGB 128, which
    normalises to 0.0039 here, so a tile greyed cell by cell stays a tile and the token count holds."""
    from vrp.interventions import mask

    adapter = tiny[1]
    enc = adapter.encode([random_image(np.random.default_rng(5), 64, 64)], ["Is there a star?"])
    masked = mask.mask_cells(adapter, enc, [list(range(16, 32))])  # every cell of tile (0, 0)
    assert (masked[0, 0] != 0).all() and torch.equal(
        masked[0, 0], masked[0, 0, :, :1, :1].expand_as(masked[0, 0])
    )
    with torch.no_grad():
        logits = adapter.model(**{**enc.inputs, "pixel_values": masked}).logits
        plain = adapter.model(**enc.inputs).logits
    assert logits.shape == plain.shape and not torch.equal(logits, plain)
    # a grey that normalises to exactly 0.0 would make the tile padding: refused with a clear message
    with pytest.raises(ValueError, match="every value is 0.0"):
        mask.mask_cells(adapter, enc, [list(range(16, 32))], value=torch.zeros(3))


def test_one_bright_block_lights_its_cells_in_its_tile_and_the_global_view(tiny):
    """A 64 px image is cut into four 32 px tiles unresized; a bright 16 px block at y 16..32,
    x 32..48 is cells (2..3, 0..1) of tile (0, 1) and, squashed to the 32 px global view, cell (1, 2)."""
    change = bright_block_change(tiny[1], 64, slice(16, 32), slice(32, 48))
    assert [len(c) for c in change] == [16] * 5
    lit = [2 * 4 + 0, 2 * 4 + 1, 3 * 4 + 0, 3 * 4 + 1]
    assert (change[2][lit] > 1e-4).all() and np.delete(change[2], lit).max() < 1e-4  # VRP grid 2 = tile 1
    for grid in (1, 3, 4):  # the other tiles do not see the block
        assert change[grid].max() < 1e-4
    # the global view's resize rings a little into neighbouring cells: the block's cell dominates
    assert int(np.argmax(change[0])) == 1 * 4 + 2
    assert change[0][6] > 3 * np.delete(change[0], 6).max()


def test_capture_keeps_each_grid_and_a_stitched_map_over_the_image(tiny):
    adapter = tiny[1]
    rng = np.random.default_rng(1)
    enc = adapter.encode([random_image(rng, 64, 64), random_image(rng, 30, 64)], ["Is there a star?"] * 2)
    cap = capture_batch(adapter, enc, ["yes", "no"], max_new_tokens=1)
    for b, layout in enumerate(enc.layouts):
        for layer in range(adapter.num_layers):
            grids = assert_grid_and_stitched_maps(cap, layout, b, layer)
            # no separator tokens: the grids hold the layer's whole image mass
            assert sum(g.mass for g in grids) == pytest.approx(cap.layers[b][layer]["image_mass"], rel=1e-5)


def test_without_image_splitting_one_grid_is_the_squashed_picture(tiny):
    adapter = tiny[1]
    ip = adapter.processor.image_processor
    ip.do_image_splitting = False
    try:
        rng = np.random.default_rng(2)
        images = [random_image(rng, 48, 64), random_image(rng, 64, 40)]
        enc = adapter.encode(images, ["Is there a star?"] * 2)
        views = adapter.model_views(images)
        masked = changed_pixels(adapter, enc, [[5], [15]])
    finally:
        ip.do_image_splitting = True
    assert [layout.multi for layout in enc.layouts] == [False, False]
    assert enc.grids == [(4, 4), (4, 4)] and enc.image_sizes == [(32, 32), (32, 32)]
    assert enc.inputs["pixel_values"].shape == (2, 1, 3, 32, 32)
    # the view, normalised the processor's way, is exactly the one tile the model was given
    for b, view in enumerate(views):
        normalised = (view.astype(np.float32) / 255 - 0.5) / 0.5
        np.testing.assert_allclose(normalised.transpose(2, 0, 1), enc.inputs["pixel_values"][b, 0], atol=1e-5)
    expected = torch.zeros_like(masked)
    expected[0, 0, :, 8:16, 8:16] = True
    expected[1, 0, :, 24:32, 24:32] = True
    assert torch.equal(masked, expected)


def test_vrp_ingest_run_writes_every_grid_and_the_stitched_map(tiny, shapes_workspace):
    root, data = shapes_workspace("idefics3-ingest", images=2, seed=3)
    # shapes-POPE's 80 px images: longest edge to 64, 2 x 2 tiles + the global view
    ingest_multi_grid(tiny[0], data, root / "lake", n_grids=5)
