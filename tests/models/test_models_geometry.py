"""Geometry of the real checkpoints, checked without their weights.

Each model is built from a config with its published sizes on the ``meta`` device (no memory, no
download), with a processor made of the published image-processor settings and the tiny word-level
tokenizer (the tokenizer does not affect geometry). The first GPU run must not be the first time the
adapters meet 336 px CLIP, 224 px SigLIP or Qwen2-VL's dynamic grid.
"""

from __future__ import annotations

import math

import pytest
import torch
from model_util import meta_wrap
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from vrp.ingest.models.llava import LlavaAdapter
from vrp.ingest.models.paligemma import PaliGemmaAdapter
from vrp.ingest.models.qwen2vl import QWEN_CHAT_TEMPLATE, ImageOnlyQwen2VLProcessor, Qwen2VLAdapter
from vrp.ingest.models.tiny import tiny_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)


def _check_modules(adapter, norm_class: str, vocab: int) -> None:
    layers = adapter.decoder_layers()
    assert len(layers) == adapter.num_layers
    assert all(type(adapter.mlp(i)).__name__.endswith("MLP") for i in (0, adapter.num_layers - 1))
    assert adapter.mlp(0).down_proj.out_features == adapter.hidden_size
    assert adapter.attn(0).o_proj.out_features == adapter.hidden_size
    assert type(adapter.final_norm()).__name__ == norm_class
    assert adapter.unembedding().in_features == adapter.hidden_size
    assert adapter.unembedding().out_features == vocab
    assert all(p.is_meta for p in adapter.model.parameters())  # nothing was allocated


def _photo(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (90, 120, 150))


def test_llava_1_5_7b_geometry():
    tokenizer = tiny_tokenizer("llava")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    adapter = meta_wrap(LlavaAdapter, model, processor)
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"  # CLS dropped
    assert (adapter.num_layers, adapter.hidden_size, adapter.num_heads, adapter.num_kv_heads) == (
        32,
        4096,
        32,
        32,
    )
    enc = adapter.encode([_photo(640, 480), _photo(300, 500)], ["Is there a dog?", "Is there a cat in it?"])
    # 336 / 14 = 24 patches a side; CLIP emits 24*24 + 1 (CLS) = 577 features, 576 after dropping CLS
    assert [p.numel() for p in enc.image_pos] == [576, 576]
    assert enc.grids == [(24, 24), (24, 24)]
    assert enc.image_sizes == [(336, 336), (336, 336)]
    assert adapter.patch_box(enc, 0, 575) == (322, 322, 336, 336)
    # 640x480: shortest edge 480 -> 336, width 448; centre crop takes x in [56, 392) of the resize,
    # i.e. original x in [80, 560): the top-left cell (0..14 px) maps back to x in [80, 100), y in [0, 20)
    assert adapter.pixel_box_to_original(enc, 0, adapter.patch_box(enc, 0, 0)) == (80, 0, 100, 20)
    _check_modules(adapter, "LlamaRMSNorm", 32064)


def test_paligemma_3b_224_geometry():
    tokenizer = tiny_tokenizer("paligemma")
    image_processor = SiglipImageProcessorPil(
        size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    image_processor.image_seq_length = 256
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        vision_use_head=False,
    )
    text = GemmaConfig(
        hidden_size=2048,
        intermediate_size=16384,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=257216,
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        vocab_size=257216,
        projection_dim=2048,
        hidden_size=2048,
    )
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    adapter = meta_wrap(PaliGemmaAdapter, model, processor)
    assert (adapter.num_layers, adapter.hidden_size, adapter.num_kv_heads, adapter.head_dim) == (
        18,
        2048,
        1,
        256,
    )
    enc = adapter.encode(
        [_photo(640, 480), _photo(224, 224)], ["Is there a dog?", "Is there a big red dog here?"]
    )
    assert [p.numel() for p in enc.image_pos] == [256, 256]
    assert enc.grids == [(16, 16), (16, 16)] and enc.image_sizes == [(224, 224), (224, 224)]
    mask = enc.inputs["attention_mask"]
    for row in range(2):
        first_real = int(torch.nonzero(mask[row]).flatten()[0])
        assert torch.equal(
            enc.image_pos[row], torch.arange(first_real, first_real + 256)
        )  # image tokens first
    assert adapter.spec.prefix_bidirectional and model.config.text_config.use_bidirectional_attention
    # SigLIP resizes straight to 224x224: cell 0 (14 px) of a 640x480 photo is 40 x 30 original pixels
    assert adapter.pixel_box_to_original(enc, 0, adapter.patch_box(enc, 0, 0)) == (0, 0, 40, 30)
    _check_modules(adapter, "GemmaRMSNorm", 257216)


def _qwen2vl_7b(min_pixels: int, max_pixels: int) -> Qwen2VLAdapter:
    tokenizer = tiny_tokenizer("qwen2vl")
    ids = tokenizer.convert_tokens_to_ids
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    config = Qwen2VLConfig(
        text_config={
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        vision_config={
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 3584,
            "num_heads": 16,
            "mlp_ratio": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    return meta_wrap(Qwen2VLAdapter, model, processor)


def _smart_resize(h: int, w: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """Qwen2-VL's published resize rule, written out here as the test's independent reference."""
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = (
            max(factor, math.floor(h / beta / factor) * factor),
            max(factor, math.floor(w / beta / factor) * factor),
        )
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def test_qwen2_vl_7b_geometry():
    min_pixels, max_pixels = 256 * 28 * 28, 1280 * 28 * 28
    adapter = _qwen2vl_7b(min_pixels, max_pixels)
    assert (adapter.num_layers, adapter.hidden_size, adapter.num_heads, adapter.num_kv_heads) == (
        28,
        3584,
        28,
        4,
    )
    assert adapter.head_dim == 128 and sum([16, 24, 24]) == adapter.head_dim // 2
    # within bounds and multiples of 28: (h/28) x (w/28) tokens, no resize
    sizes = [(448, 644), (560, 560)]
    enc = adapter.encode([_photo(w, h) for h, w in sizes], ["Is there a dog?", "Is there a red dog in it?"])
    assert enc.grids == [(16, 23), (20, 20)]
    assert [p.numel() for p in enc.image_pos] == [16 * 23, 400]
    assert enc.image_sizes == sizes
    assert adapter.patch_box(enc, 0, 23) == (0, 28, 28, 56)  # second merged row starts at y = 28
    # out of bounds: a 2000x3000 photo shrinks under max_pixels, a 100x150 one grows over min_pixels
    big, small = adapter.encode([_photo(3000, 2000), _photo(150, 100)], ["Is there a dog?"] * 2).image_sizes
    assert big == _smart_resize(2000, 3000, min_pixels, max_pixels) and big[0] * big[1] <= max_pixels
    assert small == _smart_resize(100, 150, min_pixels, max_pixels) and small[0] * small[1] >= min_pixels
    _check_modules(adapter, "Qwen2VLRMSNorm", 152064)


def test_qwen2_vl_pixel_bounds_scale_the_token_count():
    photo = _photo(1000, 750)
    counts = []
    for max_tokens in (64, 256, 1024):
        adapter = _qwen2vl_7b(4 * 28 * 28, max_tokens * 28 * 28)
        enc = adapter.encode([photo], ["Is there a dog?"])
        grid_h, grid_w = enc.grids[0]
        assert enc.image_pos[0].numel() == grid_h * grid_w <= max_tokens
        assert enc.image_sizes[0] == (grid_h * 28, grid_w * 28)
        counts.append(grid_h * grid_w)
    assert counts[0] < counts[1] < counts[2]
