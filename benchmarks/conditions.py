"""Cost of a condition run against the image run: `blank` and `none` vs `image`, per family.

For each family, the mid-size random-weight config of ``benchmarks/capture.py`` (hidden 512,
8 decoder layers) and one batch of 336 px shapes-POPE questions (576 image tokens for LLaVA and
PaliGemma; Qwen2-VL keeps the native resolution, 144 merged tokens) go through the ingest
loop's per-batch work (``vrp.ingest.run._process_batch``: load and condition the images, encode,
capture every signal, decode the greedy answer, K self-consistency samples, build the rows; for a
condition also the first-token KL against the image run's stored last residual). Lake commits are
left out: they are the same for every condition. Variants run round-robin, median of several
repeats, printed as ratios to `image` side by side:

  image   the question's own image (today's run)
  blank   a grey image of the same size: the same tokens, so about 1.0x
  none    no image at all (LLaVA and Qwen2-VL only): no image tokens to encode or attend, below 1.0x

Usage:  python benchmarks/conditions.py [--families llava,paligemma,qwen2vl] [--batch 8] [--repeats 5] [--k 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from capture import build  # noqa: E402 - the same mid-size configs as the capture benchmark


def bench(family: str, root: Path, batch: int, repeats: int, k: int) -> dict[str, float]:
    from vrp.ingest.conditions import check_text_only, make_condition
    from vrp.ingest.datasets import dataset_task, generate_shapes_pope, load_dataset
    from vrp.ingest.models import load_adapter
    from vrp.ingest.run import IngestOptions, _process_batch
    from vrp.tasks import get_task

    path = build(family, root)
    data = generate_shapes_pope(root / "shapes", images=batch, seed=3, image_size=336)
    samples = load_dataset("shapes-pope", data_dir=str(data))[0][:batch]
    adapter = load_adapter(str(path))
    layers = list(range(adapter.num_layers))
    options = IngestOptions(model=str(path), data_dir=str(data), batch_size=batch, self_consistency=k)
    task = get_task(dataset_task(options.dataset), correct_rule=options.correct_rule)
    variants = {"image": None, "blank": make_condition("blank", samples, noise_steps=500, seed=0)}
    try:
        check_text_only(str(path))
        variants["none"] = make_condition("none", samples, noise_steps=500, seed=0)
    except ValueError:
        pass
    # the image run's last residuals, which a condition run reads from the lake for its KL
    rows, _ = _process_batch(adapter, task, samples, layers, options)
    last = adapter.num_layers - 1
    base_last = {
        r["sample_id"]: np.asarray(r["h"], dtype=np.float32)
        for r in rows["hidden"]
        if r["site"] == "resid" and r["layer"] == last
    }

    def run(condition):
        return _process_batch(
            adapter, task, samples, layers, options, condition=condition, base_last=base_last
        )

    times: dict[str, list[float]] = {name: [] for name in variants}
    for condition in variants.values():
        run(condition)  # warm-up
    for _ in range(repeats):
        for name, condition in variants.items():
            start = time.perf_counter()
            run(condition)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", default="llava,paligemma,qwen2vl")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=0, help="self-consistency samples in every variant")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"mid config (hidden 512, 8 layers), 336 px questions, batch {args.batch}, K = {args.k}, "
        f"median of {args.repeats} round-robin repeats, {args.threads} thread(s)"
    )
    print(
        f"{'family':<10} {'image s':>9} {'blank s':>9} {'none s':>9} {'blank/image':>12} {'none/image':>11}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            t = bench(family, Path(tmp) / family, args.batch, args.repeats, args.k)
            none = t.get("none")
            none_s = "-" if none is None else f"{none:.3f}"
            none_ratio = "refused" if none is None else f"{none / t['image']:.2f}x"
            print(
                f"{family:<10} {t['image']:>9.3f} {t['blank']:>9.3f} {none_s:>9} "
                f"{t['blank'] / t['image']:>11.2f}x {none_ratio:>11}"
            )


if __name__ == "__main__":
    main()
