"""Self-consistency cost: K samples from the greedy answer's prefill vs K independent generate calls.

Three variants, each the median of several runs, as ratios to the first:

  greedy   one greedy answer (transformers generate, do_sample=False, keeping its raw logits as
           VRP's capture does)
  naive    the greedy answer plus K independent sampled generate calls (the image encoded K+1 times)
  vrp      the greedy answer plus VRP's K samples decoded from its prefill cache in one batched loop

on a tiny config (fixed overheads dominate) and a mid-size one (hidden 512, 8 layers, 576 image
tokens). Targets: vrp <= 1.5x greedy on the mid-size config, <= 3x on the tiny one.

Usage:  python benchmarks/self_consistency.py [--k 10] [--repeats 5] [--max-new-tokens 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vrp.ingest.generate import sample_answers, sample_seed
from vrp.ingest.models import load_adapter
from vrp.ingest.models.tiny import build_tiny

CONFIGS = {
    "tiny": {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "image_size": 64,
        "patch_size": 8,
    },
    "mid": {
        "hidden_size": 512,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 8,
        "image_size": 336,
        "patch_size": 14,
        "vision_hidden_size": 64,
        "vision_layers": 1,
    },
}


def _median_seconds(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each variant, run round-robin so a change in machine load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench(name: str, root: Path, k: int, repeats: int, max_new_tokens: int) -> dict[str, float]:
    path = build_tiny("llava", root / name, seed=0, **CONFIGS[name])
    adapter = load_adapter(str(path))
    side = CONFIGS[name]["image_size"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    enc = adapter.encode([image], ["Is there a red circle in the image?"])
    model = adapter.model
    common = {"max_new_tokens": max_new_tokens, "pad_token_id": adapter.tokenizer.pad_token_id}

    def greedy():
        with torch.no_grad():
            return model.generate(
                **enc.inputs, do_sample=False, return_dict_in_generate=True, output_logits=True, **common
            )

    def naive():
        greedy()
        with torch.no_grad():
            for i in range(k):
                torch.manual_seed(i)
                model.generate(**enc.inputs, do_sample=True, temperature=0.7, top_p=0.9, **common)

    seeds = [[sample_seed(0, "bench", i) for i in range(k)]]

    def shared():
        out = greedy()
        sample_answers(adapter, enc, out, seeds, max_new_tokens=max_new_tokens)

    return _median_seconds({"greedy": greedy, "naive": naive, "vrp": shared}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default="tiny,mid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"K={args.k}, max_new_tokens={args.max_new_tokens}, median of {args.repeats}, "
        f"{args.threads} threads, cpu"
    )
    print(f"{'config':6} {'greedy s':>9} {'naive s':>9} {'vrp s':>9} {'naive/greedy':>13} {'vrp/greedy':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            t = bench(name, Path(tmp), args.k, args.repeats, args.max_new_tokens)
            print(
                f"{name:6} {t['greedy']:9.4f} {t['naive']:9.4f} {t['vrp']:9.4f} "
                f"{t['naive'] / t['greedy']:13.2f} {t['vrp'] / t['greedy']:11.2f}"
            )


if __name__ == "__main__":
    main()
