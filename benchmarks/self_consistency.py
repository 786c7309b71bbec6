"""Self-consistency cost: the greedy answer with K samples vs the greedy answer alone.

Four variants, each the median of several runs (round-robin), as ratios to the first:

  greedy   the greedy answer alone: transformers generate, do_sample=False, keeping its raw logits
           as VRP's capture needs them
  naive    the greedy answer plus K independent sampled generate calls (the image encoded K+1 times)
  vrp      VRP's path: a one-token prefill, then the greedy continuation and the K samples of every
           row decoded in one loop from the prompt's cache shared by all (decode_answers, as
           capture_batch runs it, without the capture)
  vrp_k0   the same path with K = 0: the greedy answer alone through VRP's loop

on a tiny config (fixed overheads dominate) and a mid-size one (hidden 512, 8 layers, 576 image
tokens). Target (issue 21): vrp <= 1.15x greedy on the mid-size config.

Usage:  python benchmarks/self_consistency.py [--k 10] [--repeats 5] [--max-new-tokens 4] [--batch 1]
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

from vrp.ingest.capture import prefill_one_token
from vrp.ingest.generate import decode_answers, sample_seed
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


def _median_seconds(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each variant's runs, run round-robin so a change in machine load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def bench(
    name: str, root: Path, k: int, repeats: int, max_new_tokens: int, batch: int
) -> dict[str, list[float]]:
    path = build_tiny("llava", root / name, seed=0, **CONFIGS[name])
    adapter = load_adapter(str(path))
    side = CONFIGS[name]["image_size"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    enc = adapter.encode([image] * batch, ["Is there a red circle in the image?"] * batch)
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

    def decoded(seeds):
        return decode_answers(
            adapter, enc, prefill_one_token(adapter, enc), seeds, max_new_tokens=max_new_tokens
        )

    seeds = [[sample_seed(0, f"bench{b}", i) for i in range(k)] for b in range(batch)]
    variants = {
        "greedy": greedy,
        "naive": naive,
        "vrp": lambda: decoded(seeds),
        "vrp_k0": lambda: decoded([[] for _ in range(batch)]),
    }
    return _median_seconds(variants, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="questions per batch (the same picture)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default="tiny,mid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"K={args.k}, max_new_tokens={args.max_new_tokens}, batch {args.batch}, median of {args.repeats} "
        f"(spread: min-max over the median), {args.threads} threads, cpu"
    )
    names = ("greedy", "naive", "vrp", "vrp_k0")
    print(f"{'config':6} " + " ".join(f"{n + ' s':>9}" for n in names) + "   ratios to greedy (spread)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            times = bench(name, Path(tmp), args.k, args.repeats, args.max_new_tokens, args.batch)
            median = {n: statistics.median(times[n]) for n in names}
            spread = {n: (max(times[n]) - min(times[n])) / median[n] for n in names}
            ratios = "  ".join(
                f"{n}/greedy {median[n] / median['greedy']:.2f} ({spread[n]:.0%})" for n in names[1:]
            )
            print(
                f"{name:6} "
                + " ".join(f"{median[n]:9.4f}" for n in names)
                + f"   greedy spread {spread['greedy']:.0%}  {ratios}"
            )


if __name__ == "__main__":
    main()
