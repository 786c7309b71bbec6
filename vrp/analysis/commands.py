"""`vrp analyze correlations|probes|margins|vqa` and `vrp report`.

``analyze`` prints tables; ``analyze probes`` also stores them in ``probe_layers`` and
``probe_neurons`` (the intervention commands read the neuron rankings from there). ``report``
only reads the lake.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence

import click
from tqdm import tqdm

from vrp.analysis import compute, data, stats
from vrp.analysis import report as rendering
from vrp.analysis.probes import SEED, ProbeError
from vrp.analysis.store import StoredProbes, fit_and_store_probes
from vrp.cli.options import (
    lake_option,
    models_option,
    n_boot_option,
    open_existing_lake,
    seed_option,
    user_errors,
)
from vrp.lake import LakeError
from vrp.lake.errors import damaged_file_error

boot_option = n_boot_option(default=stats.N_BOOT)
type_map_option = click.option(
    "--type-map",
    "type_map_file",
    type=click.Path(dir_okay=False, exists=True),
    help="Question-type prefix -> tag (JSON object, or 'prefix<TAB>tag' lines): VQA results per tag.",
)


def _type_map(path: str | None) -> dict[str, str] | None:
    from vrp.analysis.type_map import TypeMapError, read_type_map

    if path is None:
        return None
    with user_errors(TypeMapError):
        return read_type_map(path)


seed_of_folds = seed_option(default=SEED, help="Seed of the folds and the bootstrap.")


def _progress(desc: str) -> Callable[[Iterable], Iterable]:
    show = sys.stderr.isatty()
    return lambda items: tqdm(items, desc=desc, unit="layer", disable=not show)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [
        max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
        for i, h in enumerate(header)
    ]
    click.echo("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


@click.group()
def analyze() -> None:
    """Analyses of the lake: correlations, probes, margin formation (printed as tables)."""


@analyze.command()
@lake_option
@models_option
@boot_option
@seed_of_folds
@click.option(
    "--probe/--no-probe",
    default=True,
    show_default=True,
    help="Include the held-out best-layer probe (computed in memory when not stored).",
)
def correlations(lake_dir: str | None, models: tuple[str, ...], n_boot: int, seed: int, probe: bool) -> None:
    """R_pb [95% CI], p, BH q and AUROC [95% CI] of each reliability signal, per model and pooled."""
    lake = open_existing_lake(lake_dir)
    try:
        h = compute.headline(lake, models=models or None, n_boot=n_boot, seed=seed, with_probe=probe)
    except (LakeError, ProbeError, ValueError) as exc:
        raise click.ClickException(str(damaged_file_error(exc) or exc)) from exc
    if not h.rows:
        raise click.ClickException("no scored answers in the lake (or for the models asked)")
    t = rendering.detail_table(h)
    _print_table(t.header, t.rows)
    click.echo(f"\n{t.note}")


@analyze.command()
@lake_option
@models_option
@boot_option
@seed_of_folds
@click.option("--site", default="resid", show_default=True, help="Hidden-state site of the layer probes.")
@click.option(
    "--mlp/--no-mlp", default=True, show_default=True, help="Also the 2-layer MLP at the best layer."
)
@click.option(
    "--neuron-layer",
    "neuron_layers",
    multiple=True,
    type=int,
    metavar="L",
    help="Layer(s) of the mlp_out neuron rankings (negative counts from the end; "
    "default: every layer with mlp_out states).",
)
@click.option(
    "--neurons/--no-neurons",
    default=True,
    show_default=True,
    help="Compute the L1/L2 probe-neuron rankings on site mlp_out.",
)
@click.option(
    "--write/--no-write",
    default=True,
    show_default=True,
    help="Store the results in probe_layers / probe_neurons (replacing the run's previous ones).",
)
def probes(
    lake_dir: str | None,
    models: tuple[str, ...],
    n_boot: int,
    seed: int,
    site: str,
    mlp: bool,
    neuron_layers: tuple[int, ...],
    neurons: bool,
    write: bool,
) -> None:
    """Held-out probes per layer (+ last-5, MLP) and the probe-neuron rankings, per run."""
    lake = open_existing_lake(lake_dir)
    if not data.base_runs(lake, models or None):
        raise click.ClickException("no capture runs in the lake (or for the models asked)")
    outcomes = fit_and_store_probes(
        lake,
        models=models or None,
        site=site,
        seed=seed,
        n_boot=n_boot,
        mlp=mlp,
        neurons=neurons,
        neuron_layers=neuron_layers or None,
        write=write,
        progress=lambda model: _progress(f"probes {model}"),
    )
    with user_errors(ProbeError):
        for outcome in outcomes:
            _print_probes(outcome, site)
    if write:
        click.echo("\nstored in probe_layers" + (" and probe_neurons" if neurons else ""))


def _print_probes(outcome: StoredProbes, site: str) -> None:
    if outcome.probes is None:
        click.echo(f"{outcome.model} {outcome.run_id}: skipped: {outcome.skipped}", err=True)
        return
    rp = outcome.probes
    click.echo(
        f"\n{outcome.model} (run {outcome.run_id}, site {site}): {rp.results[0].n} answers, "
        f"{rp.results[0].folds} folds grouped by image" + (f"; {rp.note}" if rp.note else "")
    )
    rows = [
        [
            r.probe,
            str(r.layer),
            f"{r.auroc:.3f}",
            f"[{r.auroc_low:.3f}, {r.auroc_high:.3f}]",
            f"{r.accuracy:.3f}",
        ]
        for r in rp.results
    ]
    _print_table(["probe", "layer", "AUROC", "95% CI", "accuracy"], rows)
    for layer in sorted({r["layer"] for r in outcome.neurons}):
        top = [r for r in outcome.neurons if r["layer"] == layer and r["method"] == "l1"][:5]
        click.echo(
            f"top L1 probe neurons at layer {layer}: "
            + ", ".join(f"{r['neuron']} ({r['coef']:+.3f})" for r in top)
        )


@analyze.command()
@lake_option
@models_option
def margins(lake_dir: str | None, models: tuple[str, ...]) -> None:
    """Logit-lens margin formation by correctness, lock-in layers and spatial-entropy deltas."""
    lake = open_existing_lake(lake_dir)
    mm = compute.model_margins(lake, models or None)
    if not mm:
        raise click.ClickException("no logit-lens rows (layers table) for scored answers in the lake")
    t = rendering.margin_table(mm)
    _print_table(t.header, t.rows)
    for m in mm:
        c = m.curves
        click.echo(
            f"\n{m.model}: truth margin by layer (correct n={c.n_correct}, incorrect n={c.n_incorrect})"
        )
        rows = []
        for j, layer in enumerate(c.layers):
            locked = m.lock_in[m.lock_in >= 0]
            share = float((locked <= layer).sum()) / max(m.lock_in.size, 1)
            h = m.entropy
            rows.append(
                [
                    str(layer),
                    f"{c.mean_correct[j]:+.3f}",
                    f"{c.mean_incorrect[j]:+.3f}",
                    f"{c.separation[j]:+.3f}",
                    f"{c.auroc[j]:.3f}",
                    f"{share:.2f}",
                    "-" if h is None else f"{h.mean[j]:.3f}",
                    "-" if h is None or j == 0 else f"{h.delta[j]:+.3f}",
                ]
            )
        _print_table(
            ["layer", "correct", "incorrect", "separation", "AUROC", "locked in", "H_s", "delta H_s"], rows
        )


@analyze.command()
@lake_option
@models_option
@type_map_option
def vqa(lake_dir: str | None, models: tuple[str, ...], type_map_file: str | None) -> None:
    """Open answers: accuracy and mean VQA score per run, answer type, question type (and tag)."""
    from vrp.analysis.type_map import tag_metrics

    lake = open_existing_lake(lake_dir)
    type_map = _type_map(type_map_file)
    with user_errors(LakeError):
        rows = [r for r in data.query(lake, "vqa_metrics").to_pylist() if not models or r["model"] in models]
    if not rows:
        raise click.ClickException("no open-answer runs in the lake (ingest --dataset vqav2 or shapes-vqa)")
    shown = [r for r in rows if r["level"] != "question_type" or type_map is None]
    table = [
        [
            r["model"],
            r["run_id"],
            r["level"],
            r["type"],
            str(r["n"]),
            str(r["n_scored"]),
            rendering._num(r["accuracy"]),
            rendering._num(r["mean_score"]),
        ]
        for r in shown
    ]
    if type_map is not None:
        table += [
            [
                r["model"],
                r["run_id"],
                "tag",
                r["tag"],
                str(r["n"]),
                str(r["n_scored"]),
                rendering._num(r["accuracy"]),
                rendering._num(r["mean_score"]),
            ]
            for r in tag_metrics(rows, type_map)
        ]
    _print_table(["model", "run", "level", "group", "n", "scored", "accuracy", "mean score"], table)


@click.command()
@lake_option
@click.option(
    "--out",
    "out_dir",
    default="vrp-report",
    show_default=True,
    metavar="DIR",
    help="Output folder: each report goes to a dated subfolder, `latest` points at the newest.",
)
@click.option(
    "--force", is_flag=True, help="Render even when the lake has not changed since the last report."
)
@boot_option
@seed_of_folds
@type_map_option
def report(
    lake_dir: str | None, out_dir: str, force: bool, n_boot: int, seed: int, type_map_file: str | None
) -> None:
    """Markdown + self-contained HTML report of the study's tables and figures (reads the lake only).

    Each task gets its section: POPE metrics for yes/no runs, VQA metrics for open-answer runs.
    """
    lake = open_existing_lake(lake_dir)
    type_map = _type_map(type_map_file)
    try:
        outcome = rendering.write_report(
            lake.root, out_dir, force=force, n_boot=n_boot, seed=seed, type_map=type_map
        )
    except (LakeError, ProbeError, ValueError, OSError) as exc:
        raise click.ClickException(f"report failed: {damaged_file_error(exc) or exc}") from exc
    click.echo(outcome.message)
