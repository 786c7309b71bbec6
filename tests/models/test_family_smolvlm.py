"""SmolVLM2 (``SmolVLMForConditionalGeneration``, model type ``smolvlm``), served by the Idefics3 adapter.

SmolVLM (v1) checkpoints are Idefics3 models (test_family_idefics3 covers them and the tiling);
SmolVLM2 has its own classes and a processor that also needs num2words and torchvision for video.
This module checks what differs: the image-only processor fallback, the per-prompt image lists
``SmolVLMProcessor`` needs, and that its tiles are Idefics3's (same layout, masking, lake rows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_util import (
    assert_legacy_chat_template_read,
    changed_pixels,
    ingest_multi_grid,
    meta_wrap,
    random_image,
    tiny_checkpoint,
)
from PIL import Image
from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from vrp.ingest.models import load_adapter
from vrp.ingest.models.idefics3 import Idefics3Adapter, ImageOnlySmolVLMProcessor, _video_extras_missing
from vrp.ingest.models.tiny import build_tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "smolvlm")


@pytest.fixture(scope="module")
def tiny_idefics3(tmp_path_factory):
    path = build_tiny("idefics3", tmp_path_factory.mktemp("idefics3"), seed=0, num_layers=2)
    return load_adapter(str(path))


def test_smolvlm_is_served_by_the_idefics3_adapter(tiny):
    adapter = tiny[1]
    assert type(adapter).__name__ == "Idefics3Adapter" and adapter.spec.family == "idefics3"
    assert type(adapter.model).__name__ == "SmolVLMForConditionalGeneration"
    assert adapter.model.config.model_type == "smolvlm"


def test_without_num2words_or_torchvision_the_image_only_processor_is_built(tiny):
    adapter = tiny[1]
    if not _video_extras_missing():
        pytest.skip("num2words and torchvision are installed: AutoProcessor builds the full processor")
    assert type(adapter.processor) is ImageOnlySmolVLMProcessor
    assert adapter.settings["image_only_processor"] is True


def test_the_image_only_processor_reads_a_legacy_chat_template_json(tiny, tmp_path):
    """Hub checkpoints may keep the processor's template in chat_template.json, which the tokenizer
    does not read: the fallback processor must still render the checkpoint's own prompt."""
    if not _video_extras_missing():
        pytest.skip("num2words and torchvision are installed: AutoProcessor builds the full processor")
    assert_legacy_chat_template_read(Idefics3Adapter, tiny, tmp_path)


def test_a_batch_of_images_is_one_image_per_prompt_with_idefics3s_layout(tiny, tiny_idefics3):
    """SmolVLMProcessor reads a flat image list as one prompt's images; VRP hands it one list per prompt,
    and the tiles come out exactly as Idefics3's processor lays them out."""
    rng = np.random.default_rng(0)
    images = [random_image(rng, 64, 64), random_image(rng, 64, 32), random_image(rng, 20, 50)]
    questions = ["Is there a star?", "Is there a red circle?", "A star?"]
    smol = tiny[1].encode(images, questions)
    idefics = tiny_idefics3.encode(images, questions)
    assert torch.equal(smol.inputs["input_ids"], idefics.inputs["input_ids"])
    assert torch.equal(smol.inputs["pixel_values"], idefics.inputs["pixel_values"])
    assert [len(layout.grids) for layout in smol.layouts] == [5, 3, 3]
    for a, b in zip(smol.layouts, idefics.layouts, strict=True):
        assert [(g.rows, g.cols, g.view, list(g.positions)) for g in a.grids] == [
            (g.rows, g.cols, g.view, list(g.positions)) for g in b.grids
        ]


def test_masking_greys_exactly_the_chosen_cells_through_the_tiles(tiny):
    adapter = tiny[1]
    rng = np.random.default_rng(3)
    enc = adapter.encode([random_image(rng, 32, 64)], ["Is there a star?"])
    # 32 high x 64 wide: 1 x 2 tiles + global: tensors [tile (0,0), tile (0,1), global]
    assert enc.inputs["pixel_values"].shape == (1, 3, 3, 32, 32)
    expected = torch.zeros_like(enc.inputs["pixel_values"], dtype=torch.bool)
    expected[0, 2, :, 0:8, 24:32] = True  # global view cell (0, 3)
    expected[0, 1, :, 16:24, 8:16] = True  # tile (0, 1) cell (2, 1)
    assert torch.equal(changed_pixels(adapter, enc, [[3, 16 * 2 + 9]]), expected)


def test_smolvlm2_256m_sizes_on_the_meta_device():
    """SmolVLM2-256M's vision side (512 px tiles, 16 px patches, shuffle 4: 64 tokens a tile) on the meta
    device under the smolvlm model type: a 1024 x 512 image is 2 x 4 tiles + the global view."""
    tokenizer = tiny_tokenizer("smolvlm")
    config = SmolVLMConfig(
        vision_config=SmolVLMVisionConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=512,
            patch_size=16,
        ),
        text_config=LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49280,
        ),
        scale_factor=4,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    with torch.device("meta"):
        model = SmolVLMForConditionalGeneration(config)
    processor = ImageOnlySmolVLMProcessor(
        SmolVLMImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}),
        tokenizer,
        image_seq_len=64,
    )
    adapter = meta_wrap(
        Idefics3Adapter,
        model,
        processor,
        prompt_template="User:{image}{question}<end_of_utterance>\nAssistant:",
    )
    enc = adapter.encode([Image.new("RGB", (1024, 512), (10, 20, 30))], ["Is there a dog?"])
    # longest edge to 2048: 2048 x 1024 = 4 x 2 tiles of 512 px + the global view: 9 x 64 tokens
    assert enc.inputs["pixel_values"].shape == (1, 9, 3, 512, 512)
    assert enc.image_pos[0].numel() == 9 * 64
    assert enc.layouts[0].stitched == (16, 32) and len(enc.layouts[0].grids) == 9


def test_vrp_ingest_run_writes_every_grid_and_the_stitched_map(tiny, shapes_workspace):
    root, data = shapes_workspace("smolvlm-ingest", images=2, seed=4)
    ingest_multi_grid(tiny[0], data, root / "lake", n_grids=5)
