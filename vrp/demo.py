"""`vrp demo`: the whole study on the embedded default, on a laptop CPU.

It generates a held-out shapes-POPE benchmark (a seed no toy was trained on), ingests it with
the three shipped toy models (one per family) with K-sample self-consistency, answers the same
questions again with a grey image (``blank``) and without any image (``none``, where the family's
processor takes a text-only prompt) for the visual attribution, fits the probes, runs the
interventions (patch masking, neuron ablation, the destruction sweep, activation patching and
attention knockout) and writes the report. Every step is the same code a GPU run over
real POPE uses; only the models and the data are small.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from vrp.cli.options import lake_option, lake_root, n_boot_option
from vrp.ingest.datasets.pope import SPLITS

if TYPE_CHECKING:
    from vrp.analysis.store import StoredProbes

DEMO_SEED = 2026  # held-out data: the toys were trained on other seeds (see each toy's card.json)
TOYS = ("toy-llava", "toy-paligemma", "toy-qwen2vl")


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


def _count_lines(path: Path) -> int:
    return sum(1 for _ in path.open(encoding="utf-8")) if path.is_file() else -1


def _stage(echo: Callable[[str], None], text: str) -> None:
    echo(click.style(f"[demo] {text}", bold=True))


def run_demo(
    lake: str,
    out: str,
    *,
    questions: int = 200,
    k: int = 10,
    models: Sequence[str] = TOYS,
    data_dir: str | None = None,
    n_boot: int = 10_000,
    echo: Callable[[str], None] = click.echo,
) -> Path:
    """Every stage of the study on the toys; returns the report folder. Reruns resume."""
    from vrp.analysis.report import write_report
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

    started = time.monotonic()
    show = sys.stderr.isatty()
    data = prepare_data(Path(data_dir or f"{lake.rstrip('/')}-data"), questions)
    _stage(echo, f"held-out shapes-POPE (seed {DEMO_SEED}): {questions} questions per split in {data}")

    base_runs: dict[str, str] = {}
    for model in models:
        _stage(echo, f"ingest {model} (K = {k} self-consistency samples)")
        options = IngestOptions(
            model=model, dataset="shapes-pope", data_dir=str(data), batch_size=16, self_consistency=k
        )
        summary = run_ingest(options, lake, echo=echo, progress=show)
        for line in summary.lines():
            echo(line)
        base_runs[model] = summary.run_id
        for condition in demo_conditions(model):
            _stage(echo, f"ingest {model} with image condition {condition}")
            summary = run_ingest(replace(options, image_condition=condition), lake, echo=echo, progress=show)
            for line in summary.lines():
                echo(line)

    _stage(echo, "probes per layer (5-fold CV grouped by image), stored for the interventions")
    lake_handle = open_lake(lake)
    for outcome in fit_and_store_probes(lake_handle, n_boot=n_boot):
        echo(_probe_line(outcome))
    for model, run_id in base_runs.items():
        plans = [plan_mask(lake_handle, run_id, ratio=0.3, seed=1)]
        try:  # the best probe layer (residual stream preferred), as `destroy --layer peak` takes it
            peak: int | None = peak_layer(lake_handle, run_id)
        except InterventionError:
            peak = None
        if peak is None:
            echo(
                f"[demo] {model}: no probe could be fitted (see above), so no neuron ablation or destruction"
            )
        else:
            plans += [
                plan_ablate(lake_handle, run_id, layer=peak, top_k=5, seed=1),
                plan_destroy(lake_handle, run_id, layer=peak, order="probe", seed=1),
                plan_destroy(lake_handle, run_id, layer=peak, order="random", seed=1),
            ]
        # causal tracing: every layer and site, wrong answers patched from right ones; knockout of
        # the answer's view of the image, one layer at a time
        for site in ("resid", "attn_out", "mlp_out"):
            try:
                plans.append(plan_patch(lake_handle, run_id, site=site, layers="all", seed=1))
            except InterventionError as exc:
                echo(f"[demo] {model}: no activation patching ({exc})")
                break
        plans.append(plan_knockout(lake_handle, run_id, layers="all", source="answer"))
        for plan in plans:
            _stage(echo, f"intervention {plan.kind} on {model} ({plan.setting})")
            result = run_intervention(plan, lake, batch_size=16, echo=echo, progress=show)
            for line in result.lines():
                echo(line)

    _stage(echo, "report")
    outcome = write_report(lake, out, force=True, n_boot=n_boot)
    echo(outcome.message)
    headline = (outcome.path / "report.md").read_text(encoding="utf-8")
    echo(_headline_section(headline))
    minutes = (time.monotonic() - started) / 60
    _stage(echo, f"done in {minutes:.1f} min; report: {outcome.path / 'report.html'}")
    return outcome.path


def demo_conditions(model: str) -> list[str]:
    """``blank`` for every toy, and ``none`` where the family's processor takes a text-only prompt."""
    from vrp.ingest.conditions import ConditionError, check_text_only

    try:
        check_text_only(model)
    except ConditionError:
        return ["blank"]
    return ["blank", "none"]


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
    "--questions", default=200, show_default=True, type=click.IntRange(min=2), help="Questions per split."
)
@click.option("--self-consistency", "k", default=10, show_default=True, type=click.IntRange(min=0))
@n_boot_option(default=10_000, minimum=100)
def demo(lake_dir: str | None, out: str, questions: int, k: int, n_boot: int) -> None:
    """Run the whole study on the shipped toy models and synthetic shapes-POPE, then print the report.

    The numbers describe toy models on synthetic data: they show the instrument works, not how
    real VLMs behave. For real checkpoints see `vrp ingest run --help`.
    """
    run_demo(lake_root(lake_dir), out, questions=questions, k=k, n_boot=n_boot)
