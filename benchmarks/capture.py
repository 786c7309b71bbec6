"""Capture cost against a bare SDPA forward and against what existing tools do (eager + all outputs).

For each family, a mid-size random-weight config (hidden 512, 8 decoder layers, 576 image
tokens on a 24x24 grid) and batch sizes 1 and 8, three variants run side by side:

  (a) sdpa     a bare forward with SDPA attention (the model's own cost)
  (b) vrp      VRP's full capture: answer-row attention in float32, traced sites, logit lens,
               the greedy first token (max_new_tokens=1) and every per-layer summary
  (c) eager    eager attention with output_attentions=True, output_hidden_states=True

Time: the three variants run round-robin in one process (sdpa, vrp, eager, sdpa, ...), so a
change in the load of a shared machine hits all alike; each ratio is the median of the per-round
ratios, with its min-max spread, and the load average is printed. Memory is measured in a fresh
process per variant, on its first call: peak RSS during that call (the kernel's peak mark is
reset after the model is loaded) minus the RSS before it (on a GPU,
torch.cuda.max_memory_allocated). Prints a table with the ratios (b)/(a), (c)/(a) and the
extra-memory ratio ((c)-(a)) / ((b)-(a)), where an extra below 1 MiB counts as 1 MiB.

Usage:  python benchmarks/capture.py [--families llava,paligemma,qwen2vl] [--batches 1,8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MID = {
    "llava": {"image_size": 336, "patch_size": 14},
    "paligemma": {"image_size": 384, "patch_size": 16},
    "qwen2vl": {"image_size": 672, "patch_size": 14, "spatial_merge_size": 2, "max_pixels": 672 * 672},
}


def build(family: str, root: Path) -> Path:
    from vrp.ingest.models.tiny import build_tiny

    return build_tiny(
        family,
        root / family,
        seed=0,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8 if family == "llava" else 2,
        vision_hidden_size=64,
        vision_layers=1,
        **MID[family],
    )


def _inputs(adapter, family: str, batch: int):
    from PIL import Image

    side = MID[family]["image_size"]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(batch)]
    enc = adapter.encode(images, ["Is there a red circle in the image?"] * batch)
    assert all(len(p) == 576 for p in enc.image_pos), [len(p) for p in enc.image_pos]
    return enc


VARIANTS = ("sdpa", "vrp", "eager")


def _runner(adapter, enc, variant: str):
    from vrp.ingest.capture import capture_batch

    model = adapter.model
    if variant == "sdpa":
        return lambda: model(**enc.inputs)
    if variant == "vrp":
        labels = ["yes"] * len(enc.grids)
        return lambda: capture_batch(adapter, enc, labels, max_new_tokens=1)

    def eager():
        model.set_attn_implementation("eager")
        try:
            out = model(**enc.inputs, output_attentions=True, output_hidden_states=True)
        finally:
            model.set_attn_implementation("sdpa")
        assert len(out.attentions) == adapter.num_layers and out.attentions[0].ndim == 4
        return out

    return eager


def _load(path: str, family: str, batch: int):
    import torch

    from vrp.ingest.models import load_adapter

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = load_adapter(path, device=device)
    return adapter, _inputs(adapter, family, batch), device


def memory(path: str, family: str, variant: str, batch: int) -> dict[str, float | str]:
    """Extra peak memory (MiB) of one variant's first call, in this (fresh) process."""
    import torch

    adapter, enc, device = _load(path, family, batch)
    run = _runner(adapter, enc, variant)
    with torch.no_grad():
        # On the first call: once a run has grown the heap, the allocator reuses the freed pages
        # and later runs no longer raise the peak RSS.
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_mib()
            _reset_peak_rss()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            extra = _peak_rss_mib() - base
    return {"extra_mib": max(extra, 0.0), "device": device}


def timing(path: str, family: str, batch: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of every variant, round-robin in this process, after one warm-up call each."""
    import torch

    adapter, enc, device = _load(path, family, batch)
    runs = {variant: _runner(adapter, enc, variant) for variant in VARIANTS}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    loads = []
    with torch.no_grad():
        for run in runs.values():
            run()  # lazy allocations and kernel selection are not the variant's cost
        for _ in range(repeats):
            for variant, run in runs.items():
                start = time.perf_counter()
                run()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[variant].append(time.perf_counter() - start)
            loads.append(os.getloadavg()[0])
    return {**times, "load": loads}


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM), so loading and warm-up peaks do not count."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _peak_rss_mib() -> float:
    """Peak RSS since the last reset, from /proc/self/status (VmHWM, in kB)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", default="llava,paligemma,qwen2vl")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=4, metavar=("PATH", "FAMILY", "VARIANT", "BATCH"))
    parser.add_argument("--timing", nargs=4, metavar=("PATH", "FAMILY", "BATCH", "REPEATS"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        path, family, variant, batch = args.child
        print(json.dumps(memory(path, family, variant, int(batch))))
        return
    if args.timing:
        path, family, batch, repeats = args.timing
        print(json.dumps(timing(path, family, int(batch), int(repeats))))
        return

    def child(*extra: str) -> dict:
        cmd = [sys.executable, __file__, "--threads", str(args.threads), *extra]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    print(f"{args.repeats} round-robin rounds per (family, batch), {args.threads} threads")
    print(
        f"{'family':10} {'batch':>5} {'variant':8} {'median s':>9} {'min s':>7} {'max s':>7} "
        f"{'extra MiB':>10}  x sdpa: median of rounds (min-max)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            path = build(family, Path(tmp))
            for batch in (int(b) for b in args.batches.split(",")):
                # a fresh process per variant for memory, so the peak is that variant's alone
                mem = {v: child("--child", str(path), family, v, str(batch)) for v in VARIANTS}
                times = child("--timing", str(path), family, str(batch), str(args.repeats))
                ratio = {
                    v: sorted(a / b for a, b in zip(times[v], times["sdpa"], strict=True)) for v in VARIANTS
                }
                for v in VARIANTS:
                    t = times[v]
                    med = statistics.median(t)
                    print(
                        f"{family:10} {batch:5d} {v:8} {med:9.3f} {min(t):7.3f} {max(t):7.3f} "
                        f"{mem[v]['extra_mib']:10.1f}  x{statistics.median(ratio[v]):.2f} "
                        f"({ratio[v][0]:.2f}-{ratio[v][-1]:.2f})"
                    )
                vrp_extra = mem["vrp"]["extra_mib"] - mem["sdpa"]["extra_mib"]
                eager_extra = mem["eager"]["extra_mib"] - mem["sdpa"]["extra_mib"]
                load = ", ".join(f"{x:.1f}" for x in times["load"])
                print(
                    f"{family:10} {batch:5d} summary vrp/sdpa x{statistics.median(ratio['vrp']):.2f} "
                    f"eager/sdpa x{statistics.median(ratio['eager']):.2f}  extra memory eager/vrp "
                    f"x{eager_extra / max(vrp_extra, 1.0):.1f} (device {mem['sdpa']['device']}; "
                    f"load average {load})"
                )


if __name__ == "__main__":
    main()
