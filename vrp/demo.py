"""`vrp demo`: the whole study on the embedded default, on a laptop CPU.

It generates held-out shapes-POPE (yes/no) and shapes-VQA (open questions) benchmarks from a seed
no toy was trained on, ingests both with the three shipped toy models (one per family) with
K-sample self-consistency, answers the shapes-POPE questions again with a grey image (``blank``)
and without any image (``none``, where the family's processor takes a text-only prompt) for the
visual attribution, fits the probes, runs the interventions (patch masking, neuron ablation, the
destruction sweep, activation patching and attention knockout) on both tasks and writes the
report. Every step is the same code a GPU run over real POPE and VQAv2 uses; only the models and
the data are small. Each stage is timed; the end prints the time per stage and where the outputs are.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vrp.cli.options import lake_option, lake_root, n_boot_option
from vrp.ingest.datasets.pope import SPLITS

if TYPE_CHECKING:
    from vrp.analysis.store import StoredProbes

DEMO_SEED = 2026  # held-out data: the toys were trained on other seeds (see each toy's card.json)
TOYS = ("toy-llava", "toy-paligemma", "toy-qwen2vl")
QUESTIONS_PER_IMAGE = 4  # shapes-VQA asks 4-5 questions of most images (the count is checked)


def prepare_data(data_dir: Path, questions: int) -> Path:
    """A held-out shapes-POPE folder with exactly ``questions`` questions in each split."""
    from vrp.ingest.datasets import generate_shapes_pope

    if all(_count_lines(data_dir / f"{split}.jsonl") == questions for split in SPLITS):
        return data_dir
    # one yes/no pair per image and split: as many images as possible, so that probes grouped by
    # image have groups to cross-validate over
    generate_shapes_pope(data_dir, images=(questions + 1) // 2, seed=DEMO_SEED, max_pairs=1)
    for split in SPLITS:
        path = data_dir / f"{split}.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        if len(lines) < questions:
            raise click.ClickException(f"shapes-POPE gave only {len(lines)} {split} questions")
        path.write_text("".join(lines[:questions]), encoding="utf-8")
    return data_dir


def prepare_vqa_data(data_dir: Path, questions: int) -> Path:
    """A held-out shapes-VQA folder (same seed, so the same pictures as shapes-POPE's first images)
    with at least ``questions`` questions; the ingest takes the first ``questions`` of them."""
    from vrp.ingest.datasets import generate_shapes_vqa, load_dataset
    from vrp.ingest.datasets.shapes_vqa import is_shapes_vqa_dir

    found = len(load_dataset("shapes-vqa", data_dir=data_dir)[0]) if is_shapes_vqa_dir(data_dir) else 0
    if found < questions:
        generate_shapes_vqa(data_dir, images=-(-questions // QUESTIONS_PER_IMAGE), seed=DEMO_SEED)
        found = len(load_dataset("shapes-vqa", data_dir=data_dir)[0])
    if found < questions:
        raise click.ClickException(f"shapes-VQA gave only {found} questions for {questions} asked")
    return data_dir


class StageClock:
    """Wall time per demo stage, summed over the toys, for the closing table.

    Usage::

        clock = StageClock(click.echo)
        with clock.stage("ingest", "ingest toy-llava"):
            ...
        click.echo(clock.table())
    """

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.seconds: dict[str, float] = {}
        self.started = time.monotonic()

    @contextmanager
    def stage(self, name: str, text: str) -> Iterator[None]:
        _stage(self.echo, text)
        begin = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - begin

    def table(self) -> str:
        total = time.monotonic() - self.started
        width = max(len(name) for name in [*self.seconds, "total"])
        lines = [f"  {name:<{width}}  {secs / 60:6.2f} min" for name, secs in self.seconds.items()]
        return "\n".join(["time per stage:", *lines, f"  {'total':<{width}}  {total / 60:6.2f} min"])


def _count_lines(path: Path) -> int:
    return sum(1 for _ in path.open(encoding="utf-8")) if path.is_file() else -1


def _stage(echo: Callable[[str], None], text: str) -> None:
    echo(click.style(f"[demo] {text}", bold=True))


def run_demo(
    lake: str,
    out: str,
    *,
    questions: int = 100,
    vqa_questions: int = 150,
    k: int = 10,
    models: Sequence[str] = TOYS,
    data_dir: str | None = None,
    n_boot: int = 10_000,
    echo: Callable[[str], None] = click.echo,
) -> Path:
    """Every stage of the study on the toys; returns the report folder. Reruns resume.

    ``questions`` is per shapes-POPE split, ``vqa_questions`` the shapes-VQA total (0: yes/no only).
    """
    from tqdm import tqdm

    from vrp.analysis.report import REPORT_PARTS, write_report
    from vrp.analysis.store import fit_and_store_probes
    from vrp.ingest.run import IngestOptions, run_ingest
    from vrp.interventions import (
        InterventionError,
        plan_ablate,
        plan_destroy,
        plan_knockout,
        plan_mask,
        plan_patch,
        run_intervention,
    )
    from vrp.interventions.base import peak_layer
    from vrp.lake import open_lake
    from vrp.view import write_view

    show = sys.stderr.isatty()
    clock = StageClock(echo)
    root = Path(data_dir or f"{lake.rstrip('/')}-data")
    with clock.stage("data", f"held-out data (seed {DEMO_SEED}, never trained on)"):
        data = prepare_data(root, questions)
        echo(f"shapes-POPE: {questions} questions per split in {data}")
        vqa_data = None
        if vqa_questions:
            vqa_data = prepare_vqa_data(root.parent / f"{root.name}-vqa", vqa_questions)
            echo(f"shapes-VQA: {vqa_questions} open questions in {vqa_data}")

    base_runs: dict[str, str] = {}  # label -> run_id
    for model in models:
        with clock.stage("ingest shapes-pope", f"ingest {model} on shapes-POPE (K = {k} samples)"):
            options = IngestOptions(
                model=model, dataset="shapes-pope", data_dir=str(data), batch_size=16, self_consistency=k
            )
            summary = run_ingest(options, lake, echo=echo, progress=show)
            for line in summary.lines():
                echo(line)
            base_runs[f"{model} shapes-pope"] = summary.run_id
        for condition in demo_conditions(model):
            with clock.stage("conditions", f"ingest {model} on shapes-POPE with image condition {condition}"):
                summary = run_ingest(
                    replace(options, image_condition=condition), lake, echo=echo, progress=show
                )
                for line in summary.lines():
                    echo(line)
        if vqa_data is None:
            continue
        with clock.stage("ingest shapes-vqa", f"ingest {model} on shapes-VQA (K = {k} samples)"):
            options = IngestOptions(
                model=model,
                dataset="shapes-vqa",
                data_dir=str(vqa_data),
                limit=vqa_questions,
                batch_size=16,
                self_consistency=k,
            )
            summary = run_ingest(options, lake, echo=echo, progress=show)
            for line in summary.lines():
                echo(line)
            base_runs[f"{model} shapes-vqa"] = summary.run_id
        # an open answer's truth token is read in its image's context, so `none` is for yes/no only
        with clock.stage("conditions", f"ingest {model} on shapes-VQA with image condition blank"):
            summary = run_ingest(replace(options, image_condition="blank"), lake, echo=echo, progress=show)
            for line in summary.lines():
                echo(line)

    with clock.stage("probes", "probes per layer (5-fold CV grouped by image), stored for the interventions"):
        lake_handle = open_lake(lake)
        bars = (lambda model: _layer_bar(f"probes {model}")) if show else None
        for outcome in fit_and_store_probes(lake_handle, n_boot=n_boot, progress=bars):
            echo(_probe_line(outcome))
    for label, run_id in base_runs.items():
        plans = [plan_mask(lake_handle, run_id, ratio=0.3, seed=1)]
        try:  # the best probe layer (residual stream preferred), as `destroy --layer peak` takes it
            peak: int | None = peak_layer(lake_handle, run_id)
        except InterventionError:
            peak = None
        if peak is None:
            echo(
                f"[demo] {label}: no probe could be fitted (see above), so no neuron ablation or destruction"
            )
        else:
            plans += [
                plan_ablate(lake_handle, run_id, layer=peak, top_k=5, seed=1),
                plan_destroy(lake_handle, run_id, layer=peak, order="probe", seed=1),
                plan_destroy(lake_handle, run_id, layer=peak, order="random", seed=1),
            ]
        # causal tracing: every layer and site, wrong answers patched from right ones; knockout of
        # the answer's view of the image, one layer at a time
        tracing = []
        for site in ("resid", "attn_out", "mlp_out"):
            try:
                tracing.append(plan_patch(lake_handle, run_id, site=site, layers="all", seed=1))
            except InterventionError as exc:
                echo(f"[demo] {label}: no activation patching ({exc})")
                break
        try:
            tracing.append(plan_knockout(lake_handle, run_id, layers="all", source="answer"))
        except InterventionError as exc:
            echo(f"[demo] {label}: no knockout ({exc})")
        for name, group in (("mask / ablate / destroy", plans), ("patching + knockout", tracing)):
            for plan in group:
                with clock.stage(name, f"intervention {plan.kind} on {label} ({plan.setting})"):
                    result = run_intervention(plan, lake, batch_size=16, echo=echo, progress=show)
                    for line in result.lines():
                        echo(line)

    view = Path(out) / "view"
    with clock.stage("view", f"viewer: a page per sample in {view}"):
        bar = partial(tqdm, desc="view", unit="sample", disable=not show)
        pages = write_view(open_lake(lake), view, progress=bar)
        echo(pages.line())
    with clock.stage("report", "report"):
        with tqdm(total=len(REPORT_PARTS), desc="report", unit="part", disable=not show) as bar:
            outcome = write_report(
                lake, out, force=True, n_boot=n_boot, view=view, step=lambda part: _advance(bar, part)
            )
        echo(outcome.message)
        headline = (outcome.path / "report.md").read_text(encoding="utf-8")
        echo(_headline_section(headline))
    echo(clock.table())
    _stage(echo, f"report: {outcome.path / 'report.html'}; viewer: {view / 'index.html'}")
    return outcome.path


def demo_conditions(model: str) -> list[str]:
    """``blank`` for every toy, and ``none`` where the family's processor takes a text-only prompt."""
    from vrp.ingest.conditions import ConditionError, check_text_only

    try:
        check_text_only(model)
    except ConditionError:
        return ["blank"]
    return ["blank", "none"]


def _advance(bar: Any, part: str) -> None:
    """One report part done: the bar names it and moves on."""
    bar.set_postfix_str(part)
    bar.update()


def _layer_bar(desc: str) -> Callable[[Iterable], Iterable]:
    """A progress bar over a run's layers (the probes' inner loop)."""
    from tqdm import tqdm

    return lambda items: tqdm(items, desc=desc, unit="layer")


def _probe_line(outcome: StoredProbes) -> str:
    """One line per run: the best residual-stream probe layer, or why there is none."""
    from vrp.analysis.probes import best_layer

    if outcome.probes is None:
        return f"{outcome.model}: no probes ({outcome.skipped})"
    layer = best_layer(outcome.probes.results)
    best = next(r for r in outcome.probes.results if r.probe == "logreg" and r.layer == layer)
    return (
        f"{outcome.model}: best probe layer {best.layer}, held-out AUROC {best.auroc:.3f} "
        f"[{best.auroc_low:.3f}, {best.auroc_high:.3f}] over {best.n} answers"
    )


def _headline_section(markdown: str) -> str:
    """The report's first table (the study's headline), for the terminal."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return markdown
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    title = next((lines[i] for i in range(start, -1, -1) if lines[i].startswith("#")), "")
    return "\n".join([title, *lines[start:end]])


@click.command()
@lake_option
@click.option("--out", default="vrp-report", show_default=True, help="Report folder.")
@click.option(
    "--questions", default=100, show_default=True, type=click.IntRange(min=2), help="Questions per split."
)
@click.option(
    "--vqa-questions",
    default=150,
    show_default=True,
    type=click.IntRange(min=0),
    help="shapes-VQA open questions per toy (0: the yes/no half only).",
)
@click.option("--self-consistency", "k", default=10, show_default=True, type=click.IntRange(min=0))
@n_boot_option(default=10_000, minimum=100)
def demo(lake_dir: str | None, out: str, questions: int, vqa_questions: int, k: int, n_boot: int) -> None:
    """Run the whole study on the shipped toy models and synthetic shapes-POPE and shapes-VQA, then
    print the report's headline, the time per stage and where the report is.

    The numbers describe toy models on synthetic data: they show the instrument works, not how
    real VLMs behave. For real checkpoints see `vrp ingest run --help`.
    """
    run_demo(lake_root(lake_dir), out, questions=questions, vqa_questions=vqa_questions, k=k, n_boot=n_boot)
