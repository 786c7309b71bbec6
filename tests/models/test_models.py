"""Family adapters on tiny random-weight checkpoints built by ``build_tiny`` and loaded like a user's.

Every expectation is computed independently of the adapter: hand-worked token counts and resize
arithmetic, which embeddings actually change when the image changes, which vision patches a pixel edit
reaches, the model's own logits, unbatched runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vrp.ingest.models import FAMILIES, REGISTRY, answer_token_ids, load_adapter
from vrp.ingest.models.loading import checkpoint_revision
from vrp.ingest.models.qwen2vl import _torchvision_missing
from vrp.ingest.models.registry import tiny_variants
from vrp.ingest.models.tiny import build_tiny
from vrp.tasks.yesno import yes_no_ids

FAMILY_NAMES = tiny_variants()  # every registered family and its variants
QUESTIONS = ("Is there a red circle in the image?", "A star?")


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {family: build_tiny(family, tmp_path_factory.mktemp(family), seed=3) for family in FAMILY_NAMES}


@pytest.fixture(scope="module")
def adapters(tiny_dirs):
    torch.set_num_threads(1)
    return {family: load_adapter(str(path)) for family, path in tiny_dirs.items()}


def _images(seed: int = 0) -> list[Image.Image]:
    """Two random images of different shapes (40x50 and 64x64), so Qwen2-VL gets different grids."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
    ]


# Hand-worked geometry of the tiny checkpoints (defaults: 32 px images; LLaVA/PaliGemma patch 8;
# Qwen2-VL patch 4, merge 2, min_pixels (2*8)^2 = 256, max_pixels 32*32 = 1024).
# Qwen2-VL 40x50: round to multiples of 8 -> 40x48 = 1920 > 1024, beta = sqrt(2000/1024) = 1.3975,
# h = floor(40/1.3975/8)*8 = 24, w = floor(50/1.3975/8)*8 = 32 -> 3x4 merged cells of 8 px.
# Qwen2-VL 64x64: 4096 > 1024, beta = 2, 32x32 -> 4x4.
EXPECTED = {
    "llava": {"grids": [(4, 4), (4, 4)], "sizes": [(32, 32), (32, 32)], "cell": 8},
    "paligemma": {"grids": [(4, 4), (4, 4)], "sizes": [(32, 32), (32, 32)], "cell": 8},
    "qwen2vl": {"grids": [(3, 4), (4, 4)], "sizes": [(24, 32), (32, 32)], "cell": 8},
    "qwen2_5vl": {"grids": [(3, 4), (4, 4)], "sizes": [(24, 32), (32, 32)], "cell": 8},
}
# Tests with per-family expectations written out here cover these; a family added later brings its
# own in tests/models/test_family_<family>.py.
HAND_WORKED = tuple(EXPECTED)


def test_every_family_has_hand_worked_geometry_somewhere():
    here = Path(__file__).parent
    missing = [
        variant
        for variant in FAMILY_NAMES
        if variant not in EXPECTED and not (here / f"test_family_{variant}.py").is_file()
    ]
    assert missing == []


def _embeddings_into_decoder(adapter, enc) -> torch.Tensor:
    """The hidden states entering decoder layer 0 (text embeddings with image features scattered in)."""
    seen = {}

    def grab(_module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = adapter.decoder_layers()[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.model(**enc.inputs)
    finally:
        handle.remove()
    return seen["h"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_image_positions_are_where_image_features_land(adapters, family):
    adapter = adapters[family]
    images = _images()
    enc = adapter.encode(images, list(QUESTIONS))
    # Independent of the id search: the positions whose layer-0 input changes when only the image changes.
    other = adapter.encode(_images(seed=1), list(QUESTIONS))
    changed = (
        (_embeddings_into_decoder(adapter, enc) - _embeddings_into_decoder(adapter, other)).abs().amax(-1)
    )
    for row, layout in enumerate(enc.layouts):
        assert enc.image_pos[row].numel() == layout.n_tokens
        # grid cells change with the image; row separators (LLaVA-NeXT's newline tokens) do not
        cells = np.sort(np.concatenate([g.positions for g in layout.grids]))
        assert torch.equal(torch.nonzero(changed[row] > 0).flatten(), enc.image_pos[row][cells])
        # one contiguous run, or one per grid where text tokens sit between the grids (Idefics3's
        # <fake_token_around_image><row_r_col_c> before each tile)
        pos = enc.image_pos[row]
        breaks = (torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1).tolist()
        starts = sorted(int(np.min(g.positions)) for g in layout.grids)
        assert breaks in ([], starts[1:])


@pytest.mark.parametrize("family", HAND_WORKED)
def test_image_run_sits_where_the_prompt_format_puts_it(adapters, family):
    adapter = adapters[family]
    enc = adapter.encode(_images()[:1], QUESTIONS[:1])
    tokens = adapter.tokenizer.convert_ids_to_tokens(enc.inputs["input_ids"][0])
    first = int(enc.image_pos[0][0])
    last = int(enc.image_pos[0][-1])
    assert (first == 0) == adapters[family].spec.image_first
    if family == "llava":
        assert tokens[:first] == ["<s>", "USER", ":"]
        assert tokens[last + 1 :] == [
            "\n",
            *["Is", "there", "a", "red", "circle", "in", "the", "image", "?"],
            "\n",
            "ASSISTANT",
            ":",
        ]
    elif family == "paligemma":
        assert first == 0  # image tokens first
        assert tokens[last + 1 :] == [
            "<bos>",
            *["Is", "there", "a", "red", "circle", "in", "the", "image", "?"],
            "\n",
        ]
    else:
        assert tokens[first - 1] == "<|vision_start|>" and tokens[last + 1] == "<|vision_end|>"
        assert tokens[-3:] == ["<|im_start|>", "assistant", "\n"]
    assert int(enc.answer_pos[0]) == len(tokens) - 1


@pytest.mark.parametrize("family", HAND_WORKED)
def test_patch_map_round_trips(adapters, family):
    adapter = adapters[family]
    enc = adapter.encode(_images(), list(QUESTIONS))
    assert enc.grids == EXPECTED[family]["grids"]
    assert enc.image_sizes == EXPECTED[family]["sizes"]
    cell_px = EXPECTED[family]["cell"]
    for row in range(2):
        grid_h, grid_w = enc.grids[row]
        covered = np.zeros(enc.image_sizes[row], dtype=int)
        for cell in range(grid_h * grid_w):
            position = adapter.position_of(enc, row, cell)
            assert adapter.cell_of(enc, row, position) == cell
            x0, y0, x1, y1 = adapter.patch_box(enc, row, cell)
            assert (x1 - x0, y1 - y0) == (cell_px, cell_px)
            assert (y0 // cell_px, x0 // cell_px) == divmod(cell, grid_w)  # (row, col), row-major
            assert adapter.cell_at(enc, row, (x0 + x1) / 2, (y0 + y1) / 2) == cell
            covered[y0:y1, x0:x1] += 1
        assert (covered == 1).all()  # the boxes tile the preprocessed image exactly


def _patch_rows_reached(adapter, family, enc, row, box) -> list[int]:
    """Image-token slots that a pixel edit inside ``box`` reaches through the vision tower's own patching."""
    inputs = enc.inputs
    x0, y0, x1, y1 = box
    if family.startswith("qwen"):
        # Qwen2-VL's processor flattens patches; rebuild this row's pixels from a painted image instead.
        image = Image.new("RGB", (enc.image_sizes[row][1], enc.image_sizes[row][0]), (128, 128, 128))
        painted = image.copy()
        painted.paste((250, 10, 10), (x0, y0, x1, y1))
        a = adapter.processor.image_processor(images=[image], return_tensors="pt")
        b = adapter.processor.image_processor(images=[painted], return_tensors="pt")
        vision = adapter.model.config.vision_config
        assert a["image_grid_thw"].tolist()[0][1:] == [s // vision.patch_size for s in enc.image_sizes[row]]
        merge = vision.spatial_merge_size
        changed = torch.nonzero((a["pixel_values"] - b["pixel_values"]).abs().amax(-1) > 0).flatten()
        return sorted({int(i) // merge**2 for i in changed})
    pixels = inputs["pixel_values"][row : row + 1].clone()
    edited = pixels.clone()
    edited[..., y0:y1, x0:x1] += 1.0
    tower = adapter.model.model.vision_tower
    conv = next(m for name, m in tower.named_modules() if name.endswith("embeddings.patch_embedding"))
    with torch.no_grad():
        diff = (conv(edited) - conv(pixels)).abs().amax(1).flatten()  # [grid_h * grid_w], row-major
    return torch.nonzero(diff > 0).flatten().tolist()


@pytest.mark.parametrize("family", HAND_WORKED)
def test_patch_box_is_the_patch_the_vision_tower_sees(adapters, family):
    adapter = adapters[family]
    enc = adapter.encode(_images(), list(QUESTIONS))
    for row in range(2):
        grid_h, grid_w = enc.grids[row]
        for cell in (0, grid_w - 1, grid_w + 1, grid_h * grid_w - 1):
            assert _patch_rows_reached(adapter, family, enc, row, adapter.patch_box(enc, row, cell)) == [cell]


@pytest.mark.parametrize("family", HAND_WORKED)
def test_pixel_box_to_original_lands_on_the_cell(adapters, family):
    adapter = adapters[family]
    original = Image.new("RGB", (70, 50), (128, 128, 128))  # width 70, height 50: resize + crop paths
    enc = adapter.encode([original], QUESTIONS[:1])
    grid_h, grid_w = enc.grids[0]
    cell = (grid_h // 2) * grid_w + grid_w // 2
    box = adapter.pixel_box_to_original(enc, 0, adapter.patch_box(enc, 0, cell))
    painted = original.copy()
    painted.paste((255, 255, 0), box)
    processed = adapter.processor.image_processor(images=[original, painted], return_tensors="pt")
    pv = processed["pixel_values"]
    if family.startswith("qwen"):
        per_token = (pv.view(2, -1, pv.shape[-1])[1] - pv.view(2, -1, pv.shape[-1])[0]).abs()
        merge2 = adapter.model.config.vision_config.spatial_merge_size**2
        change = per_token.view(-1, merge2 * pv.shape[-1]).mean(-1)
    else:
        size = enc.cell_sizes[0][0]
        delta = (pv[1] - pv[0]).abs().mean(0)
        change = delta.view(grid_h, size, grid_w, size).mean((1, 3)).flatten()
    assert int(change.argmax()) == cell
    assert change[cell] > 0.5 * change.max() and change[cell] > 3 * np.median(change.numpy())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_yes_no_ids_decode_to_yes_no(adapters, family):
    adapter = adapters[family]
    for ids, word in ((yes_no_ids(adapter)[0], "yes"), (yes_no_ids(adapter)[1], "no")):
        decoded = {adapter.tokenizer.decode([i]).strip() for i in ids}
        assert decoded == {word, word.capitalize(), word.upper()}


def test_yes_no_ids_with_sentencepiece_style_markers():
    vocab = {"<unk>": 0, "▁yes": 1, "▁Yes": 2, "yes": 3, "▁no": 4, "No": 5, "▁": 6, "Y": 7, "▁maybe": 8}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    assert answer_token_ids(tokenizer, "yes") == [1, 2, 3]
    assert answer_token_ids(tokenizer, "no") == [4, 5]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generated_token_types_are_what_the_processor_gives_an_answer(adapters, family):
    """Every per-token input the processor returns is in the family's table, at the value it gives answers."""
    adapter = adapters[family]
    prompt = adapter.prompt(QUESTIONS[0])
    short = adapter.processed(_images()[1], prompt, None)
    full = adapter.processed(_images()[1], prompt, "yes")
    answer_len = full["input_ids"].shape[1] - short["input_ids"].shape[1]
    assert answer_len > 0
    per_token = {
        name
        for name, value in full.items()
        if name not in ("input_ids", "attention_mask", *adapter.spec.drop_inputs)
        and isinstance(value, torch.Tensor)
        and value.shape[:2] == full["input_ids"].shape
    }
    assert per_token == set(adapter.spec.generated_token_types)
    for name, value in adapter.spec.generated_token_types.items():
        assert full[name][0, -answer_len:].tolist() == [value] * answer_len


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_batch_equals_one_by_one(adapters, family):
    adapter = adapters[family]
    images = _images()
    enc = adapter.encode(images, list(QUESTIONS))
    lengths = enc.inputs["attention_mask"].sum(1)
    assert lengths[0] != lengths[1]  # padding is exercised
    assert (enc.inputs["attention_mask"][:, -1] == 1).all()  # left padding
    with torch.no_grad():
        batched = adapter.model(**enc.inputs).logits[torch.arange(2), enc.answer_pos]
        for row in range(2):
            single = adapter.encode(images[row : row + 1], QUESTIONS[row : row + 1])
            logits = adapter.model(**single.inputs).logits[0, single.answer_pos[0]]
            torch.testing.assert_close(batched[row], logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_modules_resolve_and_reproduce_the_logits(adapters, family):
    adapter = adapters[family]
    layers = adapter.decoder_layers()
    assert len(layers) == adapter.num_layers == 2
    assert adapter.mlp(1) is layers[1].mlp and adapter.attn(0) is layers[0].self_attn
    assert adapter.unembedding() is adapter.model.lm_head
    enc = adapter.encode(_images()[:1], QUESTIONS[:1])
    seen = {}
    handle = layers[-1].register_forward_hook(
        lambda _m, _a, out: seen.setdefault("h", out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            logits = adapter.model(**enc.inputs).logits
    finally:
        handle.remove()
    with torch.no_grad():
        lens = adapter.unembedding()(adapter.final_norm()(seen["h"]))
    torch.testing.assert_close(lens, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_final_norm_scale_includes_the_family_offset(adapters, family):
    adapter = adapters[family]
    norm = adapter.final_norm()
    original = norm.weight.detach().clone()
    try:
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(-0.5, 0.5, original.numel()))
        h = torch.randn(3, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
        eps = getattr(norm, "variance_epsilon", None) or norm.eps
        rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        with torch.no_grad():
            torch.testing.assert_close(norm(h), rms * adapter.final_norm_scale(), atol=1e-5, rtol=1e-5)
    finally:
        with torch.no_grad():
            norm.weight.copy_(original)
    assert adapter.spec.norm_offset == (1.0 if type(norm).__name__.startswith("Gemma") else 0.0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prefix_bidirectional_matches_the_model(adapters, family):
    """Changing the question changes an image token's layer-1 input only under a bidirectional prefix."""
    adapter = adapters[family]
    image = _images()[1:]
    a = adapter.encode(image, ["Is there a red star?"])
    b = adapter.encode(image, ["Is there a blue star?"])
    seen = []
    handle = adapter.decoder_layers()[0].register_forward_hook(
        lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            adapter.model(**a.inputs)
            adapter.model(**b.inputs)
    finally:
        handle.remove()
    pos = a.image_pos[0]
    moved = (seen[0][0, pos] - seen[1][0, pos]).abs().max() > 1e-6
    assert bool(moved) == adapter.spec.prefix_bidirectional


def test_qwen2_5_vl_is_served_by_the_qwen2vl_adapter(adapters):
    adapter = adapters["qwen2_5vl"]
    assert adapter.model.config.model_type == "qwen2_5_vl"
    assert type(adapter.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert adapter.spec.family == "qwen2vl"


def test_settings_record_prompt_and_processor(adapters):
    assert adapters["llava"].settings["prompt_template"] == "USER: {image}\n{question}\nASSISTANT:"
    assert adapters["paligemma"].settings["prompt_template"] == "{image}{question}"
    qwen = adapters["qwen2vl"].settings
    assert "{question}" in qwen["prompt_template"] and qwen["prompt_template"].endswith(
        "<|im_start|>assistant\n"
    )
    assert (qwen["min_pixels"], qwen["max_pixels"]) == (256, 1024)
    assert qwen["image_only_processor"] == _torchvision_missing()
    assert adapters["llava"].settings["image_processor"]["crop_size"] == {"height": 32, "width": 32}
    json.dumps([a.settings for a in adapters.values()])  # hashable into the run id


def test_prompt_template_override_is_used_and_recorded(tiny_dirs):
    adapter = load_adapter(str(tiny_dirs["paligemma"]), prompt_template="{image}answer en {question}")
    assert adapter.settings["prompt_template"] == "{image}answer en {question}"
    enc = adapter.encode(_images()[:1], ["Is there a star?"])
    tokens = adapter.tokenizer.convert_ids_to_tokens(enc.inputs["input_ids"][0])
    assert tokens[16:20] == ["<bos>", "answer", "en", "Is"]


def test_qwen_pixel_bounds_change_the_grid(tiny_dirs):
    adapter = load_adapter(str(tiny_dirs["qwen2vl"]), min_pixels=64 * 64, max_pixels=64 * 64)
    enc = adapter.encode(_images(), list(QUESTIONS))
    # 40x50 below min: beta = sqrt(4096/2000) = 1.431, ceil(40*1.431/8)*8 = 64, ceil(50*1.431/8)*8 = 72;
    # 64x64 stays.
    assert enc.image_sizes == [(64, 72), (64, 64)]
    assert enc.grids == [(8, 9), (8, 8)]
    assert (adapter.settings["min_pixels"], adapter.settings["max_pixels"]) == (4096, 4096)


def test_refuses_fp16_where_it_gives_nans(tiny_dirs):
    for family in ("paligemma", "qwen2vl"):
        with pytest.raises(ValueError, match="NaN.*bfloat16"):
            load_adapter(str(tiny_dirs[family]), dtype="float16")
    assert FAMILIES["llava"].fp16_nan is False


def test_bad_options_and_names_fail_clearly(tiny_dirs, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="only to dynamic-resolution"):
        load_adapter(str(tiny_dirs["llava"]), max_pixels=1000)
    with pytest.raises(ValueError, match="dtype"):
        load_adapter(str(tiny_dirs["llava"]), dtype="int8")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a supported VLM family"):
        load_adapter(str(tmp_path / "bert"))
    monkeypatch.setitem(REGISTRY, "toy-llava", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="toy model 'toy-llava' is not built"):
        load_adapter("toy-llava")
    with pytest.raises(FileNotFoundError, match="not a registry name"):
        load_adapter(str(tmp_path / "nowhere" / "model.bin"))


def test_revision_is_a_content_hash_of_the_checkpoint(tiny_dirs, tmp_path, adapters):
    config = adapters["llava"].model.config
    first = checkpoint_revision(str(tiny_dirs["llava"]), config)
    assert first == adapters["llava"].revision and first.startswith("sha256:")
    assert checkpoint_revision(str(tiny_dirs["llava"]), config) == first
    other = build_tiny("llava", tmp_path / "other", seed=4)
    assert checkpoint_revision(str(other), config) != first  # same shapes, different weights


def test_short_names_and_model_column(adapters, tiny_dirs):
    assert REGISTRY["llava-1.5-7b"] == "llava-hf/llava-1.5-7b-hf"
    assert REGISTRY["qwen2-vl-7b"] == "Qwen/Qwen2-VL-7B-Instruct"
    assert REGISTRY["toy-qwen2vl"].endswith("vrp/toys/toy-qwen2vl")
    assert adapters["llava"].name == tiny_dirs["llava"].name
    assert adapters["llava"].source == str(tiny_dirs["llava"].resolve())


def test_shapes_question_is_answered_through_the_adapter(adapters):
    """A tiny model of each family yields a first-token yes/no distribution for a shapes-POPE question."""
    for adapter in adapters.values():
        enc = adapter.encode(_images()[:1], ["Is there a red circle in the image?"])
        with torch.no_grad():
            logits = adapter.model(**enc.inputs).logits[0, enc.answer_pos[0]].float()
        probs = logits.softmax(-1)
        p_yes, p_no = probs[yes_no_ids(adapter)[0]].sum(), probs[yes_no_ids(adapter)[1]].sum()
        assert 0 < float(p_yes) < 1 and 0 < float(p_no) < 1 and math.isfinite(float(p_yes / p_no))


def test_hub_id_resolves_from_the_hub_cache_with_its_commit(tmp_path, monkeypatch):
    """A hub id loads offline from the hub cache; its revision is the snapshot's commit hash."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--tiny-llava"
    build_tiny("llava", repo / "snapshots" / commit, seed=5)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    adapter = load_adapter("acme/tiny-llava")
    assert (adapter.source, adapter.name, adapter.revision) == ("acme/tiny-llava", "acme--tiny-llava", commit)


def test_llava_with_cls_kept_is_refused(tiny_dirs, tmp_path):
    """With ``vision_feature_select_strategy='full'`` the CLS feature has no grid cell: encode must refuse."""
    import shutil

    path = Path(shutil.copytree(tiny_dirs["llava"], tmp_path / "full"))
    for name in ("config.json", "processor_config.json"):
        data = json.loads((path / name).read_text())
        data["vision_feature_select_strategy"] = "full"
        (path / name).write_text(json.dumps(data))
    adapter = load_adapter(str(path))
    with pytest.raises(ValueError, match=r"17 image tokens but .* 4x4 grid.*'default'"):
        adapter.encode(_images()[:1], QUESTIONS[:1])


def test_bfloat16_loading_casts_pixels_and_stays_finite(tiny_dirs):
    adapter = load_adapter(str(tiny_dirs["paligemma"]), dtype="bfloat16")
    assert {p.dtype for p in adapter.model.parameters()} == {torch.bfloat16}
    enc = adapter.encode(_images(), list(QUESTIONS))
    assert enc.inputs["pixel_values"].dtype == torch.bfloat16
    assert enc.inputs["input_ids"].dtype == torch.long
    with torch.no_grad():
        logits = adapter.model(**enc.inputs).logits
    assert torch.isfinite(logits.float()).all()
