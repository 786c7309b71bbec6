"""End to end: what a whole `vrp ingest run` costs against the evaluation run a researcher does anyway.

On the mid config of benchmarks/capture.py (random-weight LLaVA: hidden 512, 8 decoder layers,
576 image tokens) and N POPE-format questions (a ``coco_pope_random.json`` file of JSON lines over
640x480 JPEG pictures, four questions per picture), batch B, these run in one process,
round-robin (every variant once per round, a fresh lake each time), so a change in the load of a
shared machine hits all alike:

  bare       the evaluation harness: read the pictures, the processor, ``generate`` (greedy,
             8 new tokens), decode and parse the answers; nothing else kept
  vrp        ``run_ingest`` (what `vrp ingest run` calls) with every signal, K = 0, into a new lake
  vrp_k10    the same with K = 10 self-consistency samples
  noev       ``vrp`` without evidence maps (``--no-evidence``): evidence maps vs capture
  blank      a ``--image-condition blank`` run over the lake ``vrp`` just wrote: condition vs image run
  eager      what attention tools do: eager attention, ``generate`` with ``output_attentions`` and
             ``output_hidden_states``, the answer rows and hidden states ``torch.save``d per batch

The model is loaded once and handed to every variant (``run_ingest(adapter=...)``): loading is
not what a variant costs. Prints, per variant, the median seconds and the spread (min-max) and the
load average during its runs; then every ratio as the median of the per-round ratios with their
min-max (a ratio within one round shares the machine's state). ``--view`` adds `vrp view` over a
lake of 1,000 samples at LLaVA-1.5's shape (benchmarks/evidence.py).

``--processes N`` repeats the whole round-robin in N fresh processes, one after the other, and
pools their rounds. One process is not enough: the same variant's speed differs from process to
process by up to ~8% on this machine while the rounds within a process agree to ~2%, and not
alike for every variant (transformers' DynamicCache reallocates the prompt's keys and values at
every decoding step, and whether those allocations page-fault depends on the heap's history:
glibc's mmap threshold moves as blocks are freed). The pooled ratios' spread shows that noise.

Usage:  python benchmarks/end_to_end.py [--questions 64] [--batch 8] [--repeats 3] [--processes 1]
        [--view 1000] [--variants bare,vrp,vrp_k10,noev,blank,eager] [--profile VARIANT]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture import build  # noqa: E402 - the mid config lives beside this file

OBJECTS = ("dog", "person", "car", "chair", "cup", "bottle", "bench", "umbrella")
NEW_TOKENS = 8

RATIOS = (
    ("vrp", "bare", "every signal, K = 0 (target <= 1.05)"),
    ("vrp_k10", "bare", "every signal, K = 10 (target <= 1.25)"),
    ("vrp_k10", "vrp", "K = 10 over K = 0 (self-consistency)"),
    ("vrp", "noev", "evidence maps vs capture (target <= 1.05)"),
    ("blank", "vrp", "condition run vs image run (target <= 1.0)"),
    ("eager", "bare", "eager extractor"),
)


def pope_files(root: Path, questions: int) -> Path:
    """A POPE split file and its JPEG pictures: four questions per picture, half of them 'yes'."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(questions):
        name = f"COCO_val2014_{i // 4:012d}.jpg"
        if i % 4 == 0:
            # a smooth gradient with noise: compresses like a photo, unlike pure noise
            base = np.linspace(0, 255, 480 * 640 * 3).reshape(480, 640, 3)
            pixels = np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name, quality=90)
        text = f"Is there a {OBJECTS[i % len(OBJECTS)]} in the image?"
        lines.append({"question_id": i + 1, "image": name, "text": text, "label": "yes" if i % 2 else "no"})
    path = root / "coco_pope_random.json"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def make_variants(adapter, pope: Path, batch: int, scratch: Path) -> dict[str, Callable[[], None]]:
    """One callable per variant; each writes only under `scratch` and leaves nothing behind."""
    from vrp.ingest.datasets import load_dataset, load_image
    from vrp.ingest.run import IngestOptions, run_ingest
    from vrp.tasks import get_task

    model = adapter.model
    task = get_task("yesno")
    samples = load_dataset("pope", pope_file=str(pope))[0]
    common = {"model": adapter.source, "dataset": "pope", "pope_file": str(pope), "batch_size": batch}
    quiet = {"echo": lambda _line: None, "progress": False, "adapter": adapter}
    lakes: list[Path] = []

    def new_lake() -> Path:
        for old in lakes:
            shutil.rmtree(old, ignore_errors=True)
        lakes.clear()
        lakes.append(Path(tempfile.mkdtemp(dir=scratch)))
        return lakes[0]

    def bare() -> None:
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            enc = adapter.encode([load_image(s) for s in chunk], [s.question for s in chunk])
            with torch.no_grad():
                out = model.generate(
                    **enc.inputs,
                    do_sample=False,
                    max_new_tokens=NEW_TOKENS,
                    pad_token_id=adapter.tokenizer.pad_token_id,
                )
            texts = adapter.tokenizer.batch_decode(
                out[:, enc.inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            [task.parse(text) for text in texts]

    def ingest(k: int, evidence: bool = True) -> Callable[[], None]:
        options = IngestOptions(**common, self_consistency=k, evidence=evidence)
        return lambda: run_ingest(options, str(new_lake()), **quiet)

    def blank() -> None:
        # the image run must be in the lake; it was written by `vrp` in this round (same lake)
        if not lakes or not (lakes[0] / "runs").exists():
            run_ingest(IngestOptions(**common, self_consistency=0), str(new_lake()), **quiet)
        options = IngestOptions(**common, self_consistency=0, image_condition="blank")
        run_ingest(options, str(lakes[0]), **quiet)

    def eager() -> None:
        out_dir = new_lake()
        model.set_attn_implementation("eager")
        try:
            for start in range(0, len(samples), batch):
                chunk = samples[start : start + batch]
                enc = adapter.encode([load_image(s) for s in chunk], [s.question for s in chunk])
                with torch.no_grad():
                    out = model.generate(
                        **enc.inputs,
                        do_sample=False,
                        max_new_tokens=NEW_TOKENS,
                        pad_token_id=adapter.tokenizer.pad_token_id,
                        return_dict_in_generate=True,
                        output_attentions=True,
                        output_hidden_states=True,
                    )
                rows = torch.arange(len(chunk))
                pos = enc.answer_pos
                attention = torch.stack([a[rows, :, pos] for a in out.attentions[0]]).float()
                hidden = torch.stack([h[rows, pos] for h in out.hidden_states[0][1:]]).float()
                texts = adapter.tokenizer.batch_decode(
                    out.sequences[:, enc.inputs["input_ids"].shape[1] :], skip_special_tokens=True
                )
                torch.save(
                    {"attention": attention, "hidden": hidden, "texts": texts}, out_dir / f"batch{start}.pt"
                )
        finally:
            model.set_attn_implementation("sdpa")

    return {
        "bare": bare,
        "vrp": ingest(0),
        "vrp_k10": ingest(10),
        "noev": ingest(0, evidence=False),
        "blank": blank,
        "eager": eager,
    }


def round_robin(
    variants: dict[str, Callable[[], None]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds and 1-minute load averages per variant, `repeats` rounds after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    loads: dict[str, list[float]] = {name: [] for name in variants}
    for name, fn in variants.items():
        start = time.perf_counter()
        fn()
        print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    for round_ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            loads[name].append(os.getloadavg()[0])
            print(
                f"round {round_ + 1} {name}: {times[name][-1]:.1f} s, load {loads[name][-1]:.1f}",
                file=sys.stderr,
                flush=True,
            )
    return times, loads


def profile(fn: Callable[[], None], top: int) -> None:
    """cProfile one call: the functions with the most cumulative and own time."""
    prof = cProfile.Profile()
    prof.runcall(fn)
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(top)
        print(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1, help="fresh processes whose rounds are pooled")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="bare,vrp,vrp_k10,noev,blank,eager")
    parser.add_argument("--view", type=int, default=0, help="also time `vrp view` of this many samples")
    parser.add_argument("--profile", default=None, help="cProfile one call of this variant instead")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)  # a child's rounds, for its parent
    args = parser.parse_args()
    print(
        f"mid LLaVA (hidden 512, 8 layers, 576 image tokens), {args.questions} POPE questions, "
        f"batch {args.batch}, {NEW_TOKENS} new tokens, {args.threads} threads, "
        f"{args.repeats} round-robin rounds after a warm-up in each of {args.processes} process(es); cpu",
        flush=True,
    )
    if args.processes > 1 and not args.profile:
        runs = in_processes(args)
    else:
        runs = [measure(args)]
        if runs[0] is None:  # profiled
            return
        if args.json:
            Path(args.json).write_text(json.dumps(runs[0]))
            return
    report(runs)
    if args.view:
        from evidence import view_time

        view_time(args.view, browser=False)


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]] | None:
    """This process's rounds: seconds and load averages per variant (None after ``--profile``)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from vrp.ingest.models import load_adapter

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapter = load_adapter(str(build("llava", root)))
        pope = pope_files(root / "pope", args.questions)
        everything = make_variants(adapter, pope, args.batch, root)
        if args.profile:
            everything[args.profile]()  # warm-up
            profile(everything[args.profile], args.top)
            return None
        names = args.variants.split(",")
        if "blank" in names and "vrp" in names:  # blank reads the image run `vrp` wrote this round
            names = [n for n in names if n != "blank"]
            names.insert(names.index("vrp") + 1, "blank")
        times, loads = round_robin({name: everything[name] for name in names}, args.repeats)
    return {"times": times, "loads": loads}


def in_processes(args: argparse.Namespace) -> list[dict[str, dict[str, list[float]]]]:
    """Run the round-robin in ``args.processes`` fresh processes, one after the other."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = Path(tmp) / f"process{i}.json"
            child = [sys.executable, __file__, "--processes", "1", "--json", str(out)]
            for flag in ("questions", "batch", "repeats", "threads", "variants"):
                child += [f"--{flag}", str(getattr(args, flag))]
            print(f"process {i + 1} of {args.processes}", file=sys.stderr, flush=True)
            subprocess.run(child, check=True, stdout=subprocess.DEVNULL)
            runs.append(json.loads(out.read_text()))
    return runs


def report(runs: list[dict[str, dict[str, list[float]]]]) -> None:
    """Per variant its seconds, per ratio the per-round ratios, pooled over every process's rounds."""
    names = list(runs[0]["times"])
    times = {name: [t for run in runs for t in run["times"][name]] for name in names}
    loads = {name: [x for run in runs for x in run["loads"][name]] for name in names}
    print(f"\n{'variant':8} {'median s':>9} {'min s':>8} {'max s':>8}  load avg (1 min) during its runs")
    for name in names:
        values = times[name]
        print(
            f"{name:8} {statistics.median(values):9.2f} {min(values):8.2f} {max(values):8.2f}  "
            + " ".join(f"{v:.2f}" for v in loads[name])
        )
    label = "median" if len(runs) == 1 else "pooled"
    per_process = "" if len(runs) == 1 else "  medians of each process"
    print(f"\n{'ratio':16} {label:>7} {'min':>6} {'max':>6}  what{per_process}")
    for a, b, what in RATIOS:
        if a in times and b in times:
            per_round = [x / y for x, y in zip(times[a], times[b], strict=True)]
            line = (
                f"{a + '/' + b:16} {statistics.median(per_round):7.3f} {min(per_round):6.3f} "
                f"{max(per_round):6.3f}  {what}"
            )
            if len(runs) > 1:
                medians = [
                    statistics.median(x / y for x, y in zip(run["times"][a], run["times"][b], strict=True))
                    for run in runs
                ]
                line += "  " + " ".join(f"{m:.3f}" for m in medians)
            print(line)


if __name__ == "__main__":
    main()
