"""Gemma 3: what is particular to it, checked against hand-worked token layouts and the model's own mask.

The generic tests (test_capture.py, test_generate.py, test_models.py, test_evidence.py,
tests/e2e/test_interventions.py) run on Gemma 3 through the registry: answer rows against eager
attention, resid against ``output_hidden_states``, the lens against the logits, self-consistency
against a fresh forward (with the sliding window binding), masking. Here: the token layout, the
real 4B checkpoint's geometry on the ``meta`` device, the refusals, and ``vrp ingest run``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from model_util import meta_wrap
from PIL import Image
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from vrp.cli import main
from vrp.ingest.models import load_adapter
from vrp.ingest.models.gemma3 import GEMMA3_CHAT_TEMPLATE, Gemma3Adapter
from vrp.ingest.models.tiny import build_tiny, tiny_tokenizer
from vrp.lake import open_lake

QUESTIONS = ["Is there a red circle in the image?", "A star?"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return build_tiny("gemma3", tmp_path_factory.mktemp("gemma3"), seed=2)


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    return load_adapter(str(tiny_dir))


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
    ]


def test_token_layout_is_the_chat_turn_with_one_pooled_image_block(adapter) -> None:
    # 32 px images, 4 px patches: 8x8 patches pooled 2x2 -> a 4x4 grid of 8 px cells, 16 tokens
    enc = adapter.encode(_images(), QUESTIONS)
    assert enc.grids == [(4, 4), (4, 4)] and enc.image_sizes == [(32, 32), (32, 32)]
    assert enc.cell_sizes == [(8, 8), (8, 8)]
    tokens = adapter.tokenizer.convert_ids_to_tokens(enc.inputs["input_ids"][0])
    assert tokens == [
        "<bos>",  # once: the template's, not the tokenizer's too
        "<start_of_turn>",
        "user",
        "\n",
        "\n",
        "\n",
        "<start_of_image>",
        *["<image_soft_token>"] * 16,
        "<end_of_image>",
        "\n",
        "\n",
        *["Is", "there", "a", "red", "circle", "in", "the", "image", "?"],
        "<end_of_turn>",
        "\n",
        "<start_of_turn>",
        "model",
        "\n",
    ]
    assert enc.image_pos[0].tolist() == list(range(7, 23))
    types = enc.inputs["token_type_ids"][0]
    assert types[7:23].tolist() == [1] * 16 and int(types.sum()) == 16  # only the soft tokens are image
    assert int(enc.answer_pos[0]) == len(tokens) - 1


def test_answer_tokens_get_the_generated_token_type(adapter) -> None:
    """The processor's own types for an answer written after the prompt are the family's generated type."""
    prompt = adapter.prompt(QUESTIONS[0])
    batch = adapter.processor(images=_images()[:1], text=[prompt + "yes no"], return_tensors="pt")
    assert (
        batch["token_type_ids"][0, -2:].tolist() == [adapter.spec.generated_token_types["token_type_ids"]] * 2
    )
    assert adapter.spec.generated_token_types == {"token_type_ids": 0}  # 1 would read as image


def test_the_image_block_is_bidirectional_in_the_model(adapter) -> None:
    """An early image token's layer-0 output moves when a later image patch changes: no causal mask inside."""
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    other = image.copy()
    other.paste((250, 10, 10), (24, 24, 32, 32))  # the last cell only
    a = adapter.encode([image], QUESTIONS[:1])
    b = adapter.encode([other], QUESTIONS[:1])
    seen = []
    handle = adapter.decoder_layers()[0].register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.no_grad():
            adapter.model(**a.inputs)
            adapter.model(**b.inputs)
    finally:
        handle.remove()
    first = int(a.image_pos[0][0])
    assert (seen[0][0, first] - seen[1][0, first]).abs().max() > 1e-4
    assert torch.equal(seen[0][0, :first], seen[1][0, :first])  # text before the image is causal


def test_gemma_3_4b_it_geometry_on_the_meta_device() -> None:
    """google/gemma-3-4b-it's published config: 896 px, patch 14, 256 tokens on a 16x16 grid of 56 px."""
    config = Gemma3Config(
        text_config={
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "sliding_window": 1024,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "vocab_size": 262208,
        },
        vision_config={
            "hidden_size": 1152,
            "image_size": 896,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
            "vision_use_head": False,
        },
        mm_tokens_per_image=256,
        boi_token_index=255999,
        eoi_token_index=256000,
        image_token_index=262144,
    )
    tokenizer = tiny_tokenizer("gemma3")
    image_processor = Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896}, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=False
    )
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE
    )
    # the tiny tokenizer's ids stand in for the real ones; only the counts and the grid are checked
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image_soft_token>")
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    adapter = meta_wrap(Gemma3Adapter, model, processor)
    assert (adapter.num_layers, adapter.hidden_size, adapter.num_kv_heads, adapter.head_dim) == (
        34,
        2560,
        4,
        256,
    )
    photo = Image.fromarray(np.zeros((480, 640, 3), dtype=np.uint8))
    enc = adapter.encode([photo], ["Is there a dog?"])
    assert enc.image_pos[0].numel() == 256
    assert enc.grids == [(16, 16)] and enc.image_sizes == [(896, 896)] and enc.cell_sizes == [(56, 56)]
    # 896 / 14 = 64 patches per side, pooled 4x4 by the projector into 16 per side
    projector = model.model.multi_modal_projector
    assert (projector.patches_per_image, projector.tokens_per_side, projector.kernel_size) == (64, 16, 4)
    assert model.config.text_config.layer_types.count("full_attention") == 34 // 6
    assert type(adapter.final_norm()).__name__ == "Gemma3RMSNorm" and adapter.spec.norm_offset == 1.0
    # resized straight to 896x896: cell 0 (56 px) of a 640x480 photo is 40 x 30 original pixels
    assert adapter.pixel_box_to_original(enc, 0, adapter.patch_box(enc, 0, 0)) == (0, 0, 40, 30)


def test_pan_and_scan_and_float16_are_refused(tiny_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="refusing float16 for gemma3: .*bfloat16"):
        load_adapter(str(tiny_dir), dtype="float16")
    copy = tmp_path / "pan-and-scan"
    copy.mkdir()
    for path in tiny_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    settings = json.loads((copy / "processor_config.json").read_text())
    settings["image_processor"]["do_pan_and_scan"] = True
    (copy / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="do_pan_and_scan on: .*set do_pan_and_scan to false"):
        load_adapter(str(copy))


def test_vrp_ingest_run_on_the_tiny_checkpoint(tiny_dir, tmp_path) -> None:
    from vrp.ingest.datasets import generate_shapes_pope

    data = generate_shapes_pope(tmp_path / "shapes", images=2, seed=4)
    lake = tmp_path / "lake"
    args = ["ingest", "run", "--model", str(tiny_dir), "--dataset", "shapes-pope", "--data-dir", str(data)]
    result = CliRunner().invoke(
        main, [*args, "--lake", str(lake), "--limit", "3", "--batch-size", "2", "--self-consistency", "2"]
    )
    assert result.exit_code == 0, result.output
    samples = open_lake(str(lake)).arrow("samples").to_pylist()
    assert len(samples) == 3
    maps = open_lake(str(lake)).arrow("attention_maps").to_pylist()
    assert {(m["grid_h"], m["grid_w"]) for m in maps} == {(4, 4)}
    for m in maps:
        assert abs(sum(m["map"]) - 1.0) < 1e-4
