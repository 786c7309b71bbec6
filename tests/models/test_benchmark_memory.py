"""benchmarks/capture.py's CPU allocator peak reports what was allocated, checked against known sizes.

Peak RSS cannot resolve the memory targets of the capture benchmark, so the benchmark reads the
allocator's peak from torch.profiler (``AllocatorPeak``). Here it must report tensors of known
size exactly (a peak, not a sum of allocations) and numpy's buffers apart from torch's, and an
eager forward with ``output_attentions`` at least the bytes of the attention weights and logits
it returns, worked out from the shapes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

MIB = 2**20
BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "capture.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("capture_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _three_blocks_then_one() -> torch.Tensor:
    """3 x 8 MiB live at once, all freed, then 16 MiB: the peak is 24 MiB, the allocations 40."""
    blocks = []
    for _ in range(3):
        blocks.append(torch.ones(8 * MIB, dtype=torch.uint8))
    assert all(int(b[-1]) == 1 for b in blocks)  # a view and a scalar read: no allocation
    del blocks
    return torch.zeros(16 * MIB, dtype=torch.uint8)


def test_the_peak_of_known_tensors_is_exact(bench) -> None:
    older = torch.ones(4 * MIB, dtype=torch.uint8)  # live before the block: not part of its extra
    with bench.AllocatorPeak(sites=True) as peak:
        kept = _three_blocks_then_one()
        del older  # freeing an older tensor must not lower the count below the block's own bytes
        array = np.ones(MIB // 8)  # 1 MiB of float64 from numpy's allocator, not torch's
        del array
    assert kept.numel() == 16 * MIB
    assert 24 * MIB <= peak.extra_bytes <= 24 * MIB + 4096
    assert MIB <= peak.python_bytes <= MIB + 64 * 1024
    sites = dict(peak.live_at_peak)
    assert sum(sites.values()) == peak.extra_bytes
    [(site, size)] = [(s, n) for s, n in sites.items() if n >= MIB]
    assert size == 24 * MIB and "_three_blocks_then_one" in site and "aten::ones" in site


def test_an_eager_forward_counts_the_attention_it_returns(bench, tiny_adapter) -> None:
    layers, heads = 2, 4
    adapter = tiny_adapter("llava", seed=0, num_layers=layers, num_heads=heads, image_size=112, patch_size=14)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(2)]
    enc = adapter.encode(images, ["Is there a red circle in the image?", "Is there a square?"])
    batch, tokens = enc.inputs["input_ids"].shape
    vocab = adapter.model.config.text_config.vocab_size
    model = adapter.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), bench.AllocatorPeak() as eager:
            out = model(**enc.inputs, output_attentions=True)
        with torch.no_grad(), bench.AllocatorPeak() as bare:
            model(**enc.inputs)
    finally:
        model.set_attn_implementation("sdpa")
    # float32 weights [B, H, T, T] per layer and logits [B, T, V], by hand from the shapes
    attention = layers * batch * heads * tokens * tokens * 4
    logits = batch * tokens * vocab * 4
    assert [tuple(a.shape) for a in out.attentions] == [(batch, heads, tokens, tokens)] * layers
    assert eager.extra_bytes >= attention + logits
    # without the attention outputs the same forward holds one layer's weights at a time (computed,
    # then dropped) instead of all of them
    assert eager.extra_bytes - bare.extra_bytes >= attention * (layers - 1) / layers
