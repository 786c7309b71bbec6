"""Capture cost against a bare SDPA forward and against what existing tools do (eager + all outputs).

For each family, a mid-size random-weight config (hidden 512, 8 decoder layers, 576 image
tokens on a 24x24 grid) and batch sizes 1 and 8, three variants run side by side:

  (a) sdpa     a bare forward with SDPA attention (the model's own cost), the last position's logits
  (b) vrp      VRP's full capture: answer-row attention in float32, traced sites, logit lens,
               the greedy first token (max_new_tokens=1) and every per-layer summary
  (c) eager    eager attention with output_attentions=True, output_hidden_states=True

Time: the three variants run round-robin in one process (sdpa, vrp, eager, sdpa, ...), so a
change in the load of a shared machine hits all alike; each ratio is the median of the per-round
ratios, with its min-max spread, and the load average is printed.

Memory: a fresh process per variant, after the model is loaded and the inputs are encoded. Each
number is the variant's extra peak over what was live when its call began:
  alloc  torch's allocator: peak of the live tensor bytes during the call minus their value at
         the start. On a GPU, torch.cuda.max_memory_allocated - memory_allocated; on the CPU the
         same quantity read from torch.profiler (profile_memory=True), which hears every
         allocation and free of torch's CPU allocator with the allocator's running total
         (AllocatorPeak): exact to the byte and the same in every run.
  py     on the CPU only, numpy arrays and Python objects (VRP's summaries run in numpy), which
         torch's allocator never sees: tracemalloc's peak during the call over its start.
  rss    on the CPU only, the first call's peak RSS (the kernel's peak mark reset after loading)
         minus the RSS before it: everything the process touched (also BLAS scratch and what a
         first call loads), but only to within ~100-200 MiB run to run, since the heap reuses
         pages freed earlier. alloc and py are measured on a second call in the same process,
         so the profiler's own records never reach the RSS.
The ratios are the issue's "extra peak memory over the bare forward", (c)-(a) against (b)-(a):
once with alloc + py (the two peaks may fall at different times, so their sum is an upper bound)
and once with rss; an extra below 1 MiB counts as 1 MiB.

Usage:  python benchmarks/capture.py [--families llava,paligemma,qwen2vl] [--batches 1,8] [--repeats 7]
        python benchmarks/capture.py --no-timing --sites 8   (memory only; the allocations live at VRP's peak)
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
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        return lambda: model(**enc.inputs, logits_to_keep=1)  # the last position's logits, as generate's
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


def memory(path: str, family: str, variant: str, batch: int, sites: int = 0) -> dict[str, Any]:
    """Extra peak memory (MiB) of one variant's call in this (fresh) process: allocator and RSS.

    ``sites``: how many of the allocation sites live at the allocator's peak to report (0: none).
    """
    import torch

    adapter, enc, device = _load(path, family, batch)
    run = _runner(adapter, enc, variant)
    live: list[tuple[str, int]] = []
    with torch.no_grad():
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            alloc, python, rss = (torch.cuda.max_memory_allocated() - base) / 2**20, None, None
        else:
            # RSS on the first call: once a run has grown the heap, the allocator reuses the freed
            # pages and later runs no longer raise the peak RSS.
            base = _rss_mib()
            _reset_peak_rss()
            run()
            rss = max(_peak_rss_mib() - base, 0.0)
            with AllocatorPeak(sites=sites > 0) as peak:
                run()
            alloc, python = peak.extra_bytes / 2**20, peak.python_bytes / 2**20
            live = peak.live_at_peak[:sites]
    return {
        "alloc_mib": alloc,
        "python_mib": python,
        "rss_mib": rss,
        "device": device,
        "sites": [[site, size / 2**20] for site, size in live],
    }


class AllocatorPeak:
    """Peak of torch's CPU allocator inside the block, over what was live when it began.

    Usage::

        with AllocatorPeak() as peak:
            model(**inputs)
        peak.extra_bytes  # like torch.cuda.max_memory_allocated() - memory_allocated() on a GPU
        peak.python_bytes  # numpy arrays and Python objects, which torch's allocator never sees

    Peak RSS cannot tell two variants apart when they differ by less than the pages the heap
    happens to reuse (~100 MiB here); the allocator's own count can. With ``profile_memory=True``
    the profiler records every allocation and free of torch's CPU allocator together with the
    allocator's running total of live bytes (``total_allocated``); the peak of that total minus
    its value before the block's first allocation is the block's extra peak, to the byte. Only
    blocks allocated inside the profiled block are counted, so freeing an older tensor does not
    lower the count (the result is then an upper bound).

    Memory that bypasses torch's allocator is not in ``extra_bytes``: numpy arrays and Python
    objects (VRP's per-layer summaries run in numpy) are measured apart, as tracemalloc's peak over
    its value at the start (numpy reports its buffers to tracemalloc), in ``python_bytes``; the two
    peaks may fall at different times, so their sum bounds the block's extra from above. BLAS and
    oneDNN scratch is seen by neither.

    ``sites=True`` also records Python stacks (slower) and fills ``live_at_peak``: the bytes still
    live at the peak, summed per allocation site (innermost frame outside torch, and the aten op),
    largest first; they add up to ``extra_bytes``.
    """

    def __init__(self, *, sites: bool = False) -> None:
        self.sites = sites
        self.extra_bytes = 0
        self.python_bytes = 0
        self.live_at_peak: list[tuple[str, int]] = []
        self._profile: Any = None
        self._stop_tracing = False
        self._python_base = 0

    def __enter__(self) -> AllocatorPeak:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=self.sites)
        self._profile.__enter__()
        # tracemalloc inside the profiler, so the profiler's own Python objects are not counted
        self._stop_tracing = not tracemalloc.is_tracing()
        if self._stop_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._python_base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        self.python_bytes = max(tracemalloc.get_traced_memory()[1] - self._python_base, 0)
        if self._stop_tracing:
            tracemalloc.stop()
        self._profile.__exit__(*exc)
        if exc[0] is not None:
            return
        tree = self._profile.profiler.kineto_results.experimental_event_tree()
        events = sorted(_cpu_allocations(tree), key=lambda e: e.start_time_ns)
        if not events:
            return
        totals = [e.extra_fields.total_allocated for e in events]
        base = totals[0] - events[0].extra_fields.alloc_size
        at = int(np.argmax(totals))
        self.extra_bytes = max(totals[at] - base, 0)
        if self.sites:
            self.live_at_peak = _live_sites(events[: at + 1])


def _cpu_allocations(roots: list[Any]) -> Iterator[Any]:
    """Every CPU allocation and free event under the profiler's event tree (frees: negative size)."""
    stack = list(roots)
    while stack:
        event = stack.pop()
        fields = event.extra_fields
        if hasattr(fields, "total_allocated") and str(fields.device) == "cpu":
            yield event
        stack.extend(event.children)


def _live_sites(events: list[Any]) -> list[tuple[str, int]]:
    """Bytes live after the last of ``events`` (in time order), summed per allocation site."""
    live: dict[int, tuple[int, str]] = {}
    for event in events:
        fields = event.extra_fields
        if fields.alloc_size > 0:
            live[fields.ptr] = (fields.alloc_size, _site(event))
        else:
            live.pop(fields.ptr, None)
    sizes: dict[str, int] = {}
    for size, site in live.values():
        sizes[site] = sizes.get(site, 0) + size
    return sorted(sizes.items(), key=lambda item: -item[1])


def _site(event: Any) -> str:
    """Where an allocation happened: the innermost Python frame outside torch, and its aten op."""
    from torch._C._profiler import _EventType

    op = frame = None
    parent = event.parent
    while parent is not None and frame is None:
        if parent.tag == _EventType.TorchOp:
            op = parent.name  # the outermost op under the frame, e.g. aten::repeat_interleave
        elif parent.tag == _EventType.PyCall and not parent.name.startswith(("torch/", "nn.Module:")):
            frame = parent.name
        parent = parent.parent
    return f"{frame or '?'} {op or ''}".strip()


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
    parser.add_argument("--repeats", type=int, default=7, help="round-robin timing rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-timing", action="store_true", help="measure memory only")
    parser.add_argument(
        "--sites", type=int, default=0, help="print the N largest allocation sites live at VRP's peak"
    )
    parser.add_argument("--child", nargs=5, metavar=("PATH", "FAMILY", "VARIANT", "BATCH", "SITES"))
    parser.add_argument("--timing", nargs=4, metavar=("PATH", "FAMILY", "BATCH", "REPEATS"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        path, family, variant, batch, sites = args.child
        print(json.dumps(memory(path, family, variant, int(batch), int(sites))))
        return
    if args.timing:
        path, family, batch, repeats = args.timing
        print(json.dumps(timing(path, family, int(batch), int(repeats))))
        return

    def child(*extra: str) -> dict:
        cmd = [sys.executable, __file__, "--threads", str(args.threads), *extra]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    timed = "no timing" if args.no_timing else f"{args.repeats} round-robin rounds per (family, batch)"
    print(f"{timed}, {args.threads} threads; memory: extra peak MiB of one call, fresh process per variant")
    print(
        f"{'family':10} {'batch':>5} {'variant':8} {'median s':>9} {'min s':>7} {'max s':>7} "
        f"{'alloc MiB':>10} {'py MiB':>7} {'rss MiB':>8}  x sdpa: median of rounds (min-max)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            path = build(family, Path(tmp))
            for batch in (int(b) for b in args.batches.split(",")):
                # a fresh process per variant for memory, so the peak is that variant's alone
                mem = {
                    v: child(
                        "--child", str(path), family, v, str(batch), str(args.sites if v == "vrp" else 0)
                    )
                    for v in VARIANTS
                }
                times = None
                if not args.no_timing:
                    times = child("--timing", str(path), family, str(batch), str(args.repeats))
                _print_block(family, batch, mem, times)


def _print_block(family: str, batch: int, mem: dict[str, dict], times: dict[str, list[float]] | None) -> None:
    """One (family, batch): a row per variant, then the ratios and where VRP's extra memory lives."""
    ratio = {}
    if times is not None:
        ratio = {v: sorted(a / b for a, b in zip(times[v], times["sdpa"], strict=True)) for v in VARIANTS}
    for v in VARIANTS:
        row = f"{family:10} {batch:5d} {v:8} "
        if times is not None:
            t = times[v]
            row += f"{statistics.median(t):9.3f} {min(t):7.3f} {max(t):7.3f} "
        else:
            row += f"{'-':>9} {'-':>7} {'-':>7} "
        row += f"{mem[v]['alloc_mib']:10.1f} {_mib(mem[v]['python_mib']):>7} {_mib(mem[v]['rss_mib']):>8}"
        if times is not None:
            row += f"  x{statistics.median(ratio[v]):.2f} ({ratio[v][0]:.2f}-{ratio[v][-1]:.2f})"
        print(row)
    summary = f"{family:10} {batch:5d} summary "
    if times is not None:
        summary += (
            f"vrp/sdpa x{statistics.median(ratio['vrp']):.2f} "
            f"eager/sdpa x{statistics.median(ratio['eager']):.2f}  "
        )
    summary += "extra memory over the forward, eager/vrp: "
    # the allocator's count: torch's peak plus, on the CPU, numpy's and Python's (an upper bound)
    total = {v: mem[v]["alloc_mib"] + (mem[v]["python_mib"] or 0.0) for v in VARIANTS}
    rss = {v: mem[v]["rss_mib"] for v in VARIANTS}
    for name, extra in (("alloc", total), ("rss", rss)):
        if extra["sdpa"] is None:
            continue
        vrp_extra, eager_extra = extra["vrp"] - extra["sdpa"], extra["eager"] - extra["sdpa"]
        summary += (
            f"{name} {eager_extra:.1f}/{vrp_extra:.1f} MiB = x{eager_extra / max(vrp_extra, 1.0):.1f}; "
        )
    summary += f"device {mem['sdpa']['device']}"
    if times is not None:
        summary += f"; load average {', '.join(f'{x:.1f}' for x in times['load'])}"
    print(summary)
    for site, mib in mem["vrp"]["sites"]:
        print(f"{'':17}vrp live at its peak: {mib:8.1f} MiB  {site}")


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
