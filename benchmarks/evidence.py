"""What evidence maps cost at capture, and how long `vrp view` takes for 1,000 samples.

Part 1 - capture with and without evidence maps, on the mid config of benchmarks/capture.py
(hidden 512, 8 decoder layers, 576 image tokens): both variants in one process, round-robin
(off, on, off, on, ...) so drift of a shared machine hits both alike. Prints per variant the
median and the spread (min..max) of the seconds per call, the ratio of the medians and the
median of the per-round (paired) ratios, and the evidence hooks' own time as a share of a call
without them (robust where the machine is shared); the target is <= 1.05x.

Part 2 - `vrp view` over a lake of 1,000 samples at LLaVA-1.5's shape (32 layers, a 24x24 grid,
32 heads, K = 10 sampled answers, a 336 px picture per 18 questions as in POPE), written with the
lake's own RunWriter; prints the seconds and the size of the view, per sample and extrapolated to
POPE's 9,000 questions (500 images).

Usage:  python benchmarks/evidence.py [--families llava,paligemma,qwen2vl] [--batches 1,8]
        [--repeats 7] [--samples 1000] [--skip-capture] [--skip-view]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture import _inputs, build  # noqa: E402 - the mid config lives beside this file

POPE_QUESTIONS = 9000
POPE_IMAGES = 500


def capture_ratio(families: list[str], batches: list[int], repeats: int) -> None:
    import torch

    from vrp.ingest import capture
    from vrp.ingest.capture import capture_batch
    from vrp.ingest.models import load_adapter

    # the evidence hooks' own time, summed per call: on a loaded machine the wall-clock ratio
    # swings by more than the whole effect, while this share of the call does not
    spent: list[float] = []
    plain_hook = capture.EvidenceMaps._hook

    def timed_hook(self, index):  # noqa: ANN001, ANN202 - wraps EvidenceMaps._hook
        hook = plain_hook(self, index)

        def run(*args):  # noqa: ANN002, ANN202
            start = time.perf_counter()
            hook(*args)
            spent.append(time.perf_counter() - start)

        return run

    capture.EvidenceMaps._hook = timed_hook

    header = ["family", "batch", "off median s", "off spread", "on median s", "on spread", "ratio", "paired"]
    header.append("hooks share")
    print("  ".join(header))
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            torch.manual_seed(0)
            adapter = load_adapter(str(build(family, Path(tmp))))
            layers = list(range(adapter.num_layers))
            for batch in batches:
                enc = _inputs(adapter, family, batch)
                labels = ["yes"] * batch
                variants = {"off": None, "on": layers}
                times: dict[str, list[float]] = {"off": [], "on": []}
                hook_seconds: list[float] = []
                for name in ("off", "on"):  # warm-up: lazy allocations are no variant's cost
                    capture_batch(adapter, enc, labels, max_new_tokens=1, evidence_layers=variants[name])
                for _ in range(repeats):
                    spent.clear()
                    for name in ("off", "on"):
                        start = time.perf_counter()
                        capture_batch(adapter, enc, labels, max_new_tokens=1, evidence_layers=variants[name])
                        times[name].append(time.perf_counter() - start)
                    hook_seconds.append(sum(spent))
                off, on = (statistics.median(times[n]) for n in ("off", "on"))
                spread = {n: f"{min(t):.3f}..{max(t):.3f}" for n, t in times.items()}
                # each round's on/off ratio: the two calls ran back to back, so load drift cancels
                paired = statistics.median(a / b for a, b in zip(times["on"], times["off"], strict=True))
                cells = [
                    family,
                    batch,
                    f"{off:.3f}",
                    spread["off"],
                    f"{on:.3f}",
                    spread["on"],
                    f"x{on / off:.3f}",
                    f"x{paired:.3f}",
                    f"{statistics.median(hook_seconds) / off:.2%}",
                ]
                print("  ".join(str(c) for c in cells))


def view_time(n_samples: int, *, browser: bool = True) -> float:
    """Write a lake of `n_samples` at LLaVA-1.5's shape, then `vrp view` it; returns the view's seconds."""
    from vrp.lake import open_lake
    from vrp.lake.images import image_row, store_images
    from vrp.view import write_view

    layers, heads, grid, k, per_image = 32, 32, (24, 24), 10, 18
    cells = grid[0] * grid[1]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "lake")
        lake = open_lake(root)
        run = {
            "run_id": "bench-view",
            "model": "llava-shape",
            "family": "llava",
            "dataset": "pope",
            "split": "adversarial",
            "config": {"hidden_size": 4096},
        }
        n_images = -(-n_samples // per_image)
        # smooth pictures compress like photos do not; noise over a gradient is closer to a photo's PNG
        base = np.linspace(0, 255, 336 * 336 * 3).reshape(336, 336, 3)
        pictures = [
            image_row(np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8))
            for _ in range(n_images)
        ]
        store_images(root, pictures)
        writer = lake.writer(run)
        writer.begin()
        started = time.perf_counter()
        for start in range(0, n_samples, 100):
            ids = [f"q{i:05d}" for i in range(start, min(n_samples, start + 100))]
            rows: dict[str, list[dict]] = {
                t: []
                for t in ("attention_maps", "evidence_maps", "layers", "heads", "generations", "samples")
            }
            for i, sid in zip(range(start, start + len(ids)), ids, strict=True):
                for layer in range(layers):
                    attention = rng.random(cells).astype(np.float32)
                    rows["attention_maps"].append(
                        {
                            "sample_id": sid,
                            "layer": layer,
                            "grid_h": grid[0],
                            "grid_w": grid[1],
                            "map": attention / attention.sum(),
                        }
                    )
                    rows["evidence_maps"].append(
                        {
                            "sample_id": sid,
                            "layer": layer,
                            "grid_h": grid[0],
                            "grid_w": grid[1],
                            "map": rng.normal(size=cells).astype(np.float32),
                        }
                    )
                    rows["layers"].append(
                        {"sample_id": sid, "layer": layer, "lens_truth_margin": float(rng.normal())}
                    )
                    rows["heads"].extend(
                        {
                            "sample_id": sid,
                            "layer": layer,
                            "head": h,
                            "image_mass": float(rng.random()),
                            "spatial_entropy": 6.0,
                        }
                        for h in range(heads)
                    )
                rows["generations"].extend(
                    {"sample_id": sid, "k": j, "text": "Yes", "answer": "yes", "correct": True}
                    for j in range(k)
                )
                rows["samples"].append(
                    {
                        "sample_id": sid,
                        "question": f"Is there a dining table in the image? ({i})",
                        "label": "yes",
                        "answer": "yes",
                        "answer_text": "Yes",
                        "correct": bool(i % 3),
                        "p_yes": float(rng.random()),
                        "grid_h": grid[0],
                        "grid_w": grid[1],
                        "image_hash": pictures[i // per_image]["image_hash"],
                    }
                )
            writer.commit(rows)
        writer.finish()
        print(f"lake of {n_samples} samples written in {time.perf_counter() - started:.1f} s")
        out = Path(tmp) / "view"
        started = time.perf_counter()
        summary = write_view(open_lake(root), out)
        seconds = time.perf_counter() - started
        image_bytes = sum(p.stat().st_size for p in (out / "img").glob("*.png"))
        per_sample = (summary.bytes - image_bytes) / n_samples
        per_image_bytes = image_bytes / max(1, summary.images)
        pope = POPE_QUESTIONS * per_sample + POPE_IMAGES * per_image_bytes
        print(f"vrp view of {n_samples} samples: {seconds:.1f} s, {summary.bytes / 2**20:.1f} MiB")
        if browser:
            _open_in_browser(out)
        print(
            f"per sample {per_sample / 1024:.1f} KiB of data, per picture {per_image_bytes / 1024:.1f} KiB; "
            f"a view of POPE ({POPE_QUESTIONS} questions, {POPE_IMAGES} images) at this shape: "
            f"about {pope / 2**20:.0f} MiB"
        )
        return seconds


def _open_in_browser(out: Path) -> None:
    """Seconds until the index shows its rows and a sample page its heatmap (headless chromium)."""
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("(playwright not installed: no browser timing)")
        return
    if not chromium.exists():
        print("(no /usr/bin/chromium: no browser timing)")
        return
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
    ]
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(chromium), headless=True, args=args
        )
        page = context.new_page()
        for name, path, ready in (
            ("index", out / "index.html", "#samples tbody tr"),
            ("sample page", next((out / "s").glob("*.html")), "#heatmap"),
        ):
            started = time.perf_counter()
            page.goto(path.as_uri())
            page.wait_for_selector(ready)
            print(f"browser: {name} ready in {time.perf_counter() - started:.2f} s")
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", default="llava,paligemma,qwen2vl")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--skip-capture", action="store_true")
    parser.add_argument("--skip-view", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not args.skip_capture:
        capture_ratio(args.families.split(","), [int(b) for b in args.batches.split(",")], args.repeats)
    if not args.skip_view:
        view_time(args.samples)


if __name__ == "__main__":
    main()
