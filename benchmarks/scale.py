"""Throughput of the local engine against the Ray engine, and Ray's fixed start-up cost.

On a small random-weight LLaVA (4 decoder layers, hidden 256) over N shapes-POPE questions:

  local         ``run_ingest`` in this process
  ray xW        ``run_ray_ingest`` with W actors (one model replica each) on a local Ray cluster

Each engine runs twice per repetition: once into an empty lake (the work) and once more over the
now complete lake (nothing to ingest: what remains is the fixed cost of starting the engine,
loading the model, and planning). samples/s is N over the first wall time; "net" divides N by
the difference, i.e. excludes the fixed cost. ``ray.init`` is timed on its own. On a 2-core
machine, expect Ray's overhead and no speed-up: the actors compete for the same two cores.

Usage:  python benchmarks/scale.py [--questions 192] [--workers 2] [--gpus-per-worker 0] [--repeats 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

LAYERS, HIDDEN = 4, 256


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=192)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--self-consistency", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import ray
    import torch

    from vrp.ingest.datasets import generate_shapes_pope
    from vrp.ingest.models.tiny import build_tiny
    from vrp.ingest.ray_engine import run_ray_ingest
    from vrp.ingest.run import IngestOptions, run_ingest

    torch.set_num_threads(1)
    quiet = {"echo": lambda _line: None, "progress": False}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = generate_shapes_pope(root / "shapes", images=max(4, args.questions // 6 + 1), seed=7)
        model = build_tiny("llava", root / "llava", seed=0, num_layers=LAYERS, hidden_size=HIDDEN)
        options = IngestOptions(
            model=str(model),
            data_dir=str(data),
            limit=args.questions,
            batch_size=8,
            self_consistency=args.self_consistency,
            commit_samples=16,
            device="cuda" if args.gpus_per_worker else "cpu",
        )
        engines = {
            "local": lambda lake: run_ingest(options, lake, **quiet),
            f"ray x{args.workers}": lambda lake: run_ray_ingest(
                options,
                lake,
                workers=args.workers,
                cpus_per_worker=args.cpus_per_worker,
                gpus_per_worker=args.gpus_per_worker,
                **quiet,
            ),
        }
        init = _timed(lambda: ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False))
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
        for rep in range(args.repeats):
            for name, engine in engines.items():
                lake = str(root / f"lake-{name.replace(' ', '')}-{rep}")
                work = _timed(lambda lake=lake, engine=engine: engine(lake))
                fixed = _timed(lambda lake=lake, engine=engine: engine(lake))
                results[name].append((work, fixed))
        ray.shutdown()

    n = args.questions
    model_text = f"small LLaVA ({LAYERS} layers, hidden {HIDDEN})"
    print(f"{n} questions, K={args.self_consistency}, {model_text}, median of {args.repeats}")
    print(f"ray.init (local cluster): {init:.1f} s")
    print("| engine | wall s | samples/s | fixed s (nothing to do) | net samples/s |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        work = statistics.median(w for w, _ in runs)
        fixed = statistics.median(f for _, f in runs)
        net = n / (work - fixed) if work > fixed else float("nan")
        print(f"| {name} | {work:.1f} | {n / work:.2f} | {fixed:.1f} | {net:.2f} |")


if __name__ == "__main__":
    main()
