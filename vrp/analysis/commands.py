"""`vrp analyze correlations|probes|margins|vqa|attribution|fusion` and `vrp report`.

``analyze`` prints tables; ``analyze probes`` also stores them in ``probe_layers`` and
``probe_neurons`` (the intervention commands read the neuron rankings from there). ``report``
only reads the lake.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence

import click
import numpy as np
from tqdm import tqdm

from vrp.analysis import compute, data, stats
from vrp.analysis import report as rendering
from vrp.analysis.probes import SEED, ProbeError
from vrp.analysis.store import StoredProbes, fit_and_store_probes
from vrp.cli.options import (
    format_option,
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
output_format = format_option(
    "table",
    "csv",
    "json",
    help="table for reading; csv or json (raw numbers, one record per row) for pipelines and notebooks.",
)


def _plain(value: object) -> object:
    """A JSON/CSV-safe scalar: numpy numbers as Python numbers, NaN and inf as null."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    return value


def _emit_records(fmt: str, records: Sequence[dict]) -> None:
    """Print records as JSON (a list of objects) or CSV (the union of their keys, in first-seen order)."""
    clean = [{k: _plain(v) for k, v in r.items()} for r in records]
    if fmt == "json":
        click.echo(json.dumps(clean, indent=1))
        return
    fields: dict[str, None] = {}
    for r in clean:
        fields.update(dict.fromkeys(r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(clean)
    click.echo(out.getvalue(), nl=False)


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
@click.option(
    "--fusion/--no-fusion",
    default=True,
    show_default=True,
    help="Include the held-out fused score and logit-contribution model (see `vrp analyze fusion`).",
)
@output_format
def correlations(
    lake_dir: str | None,
    models: tuple[str, ...],
    n_boot: int,
    seed: int,
    probe: bool,
    fusion: bool,
    fmt: str,
) -> None:
    """R_pb [95% CI], p, BH q and AUROC [95% CI] of each reliability signal, per model and pooled.

    With condition runs in the lake (`vrp ingest run --image-condition ...`), the per-question visual
    dependence (last-layer Δ truth margin and first-token KL against each condition) is a signal too.
    """
    lake = open_existing_lake(lake_dir)
    try:
        h = compute.headline(
            lake, models=models or None, n_boot=n_boot, seed=seed, with_probe=probe, with_fusion=fusion
        )
    except (LakeError, ProbeError, ValueError) as exc:
        raise click.ClickException(str(damaged_file_error(exc) or exc)) from exc
    if not h.rows:
        raise click.ClickException("no scored answers in the lake (or for the models asked)")
    if fmt != "table":
        _emit_records(fmt, [{k: v for k, v in dataclasses.asdict(c).items() if k != "extra"} for c in h.rows])
        return
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
@output_format
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
    fmt: str,
) -> None:
    """Held-out probes per layer (+ last-5, MLP) and the probe-neuron rankings, per run.

    With --format csv|json the probe rows (one per run, probe and layer) go to stdout and every
    message to stderr.
    """
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
    table = fmt == "table"
    records: list[dict] = []
    with user_errors(ProbeError):
        for outcome in outcomes:
            _print_probes(outcome, site, table=table)
            if outcome.probes is not None:
                records += [
                    {"model": outcome.model, "run_id": outcome.run_id, **r.row()}
                    for r in outcome.probes.results
                ]
    if write:
        click.echo("\nstored in probe_layers" + (" and probe_neurons" if neurons else ""), err=not table)
    if not table:
        _emit_records(fmt, records)


def _print_probes(outcome: StoredProbes, site: str, *, table: bool = True) -> None:
    """The probe table of one run (table format), or only its messages on stderr (csv/json)."""
    if outcome.probes is None:
        click.echo(f"{outcome.model} {outcome.run_id}: skipped: {outcome.skipped}", err=True)
        return
    rp = outcome.probes
    click.echo(
        f"\n{outcome.model} (run {outcome.run_id}, site {site}): {rp.results[0].n} answers, "
        f"{rp.results[0].folds} folds grouped by image" + (f"; {rp.note}" if rp.note else ""),
        err=not table,
    )
    if not table:
        return
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
@output_format
def margins(lake_dir: str | None, models: tuple[str, ...], fmt: str) -> None:
    """Logit-lens margin formation by correctness, lock-in layers and spatial-entropy deltas."""
    lake = open_existing_lake(lake_dir)
    mm = compute.model_margins(lake, models or None)
    if not mm:
        raise click.ClickException("no logit-lens rows (layers table) for scored answers in the lake")
    if fmt != "table":
        _emit_records(fmt, [row for m in mm for row in _margin_records(m)])
        return
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
@output_format
def vqa(lake_dir: str | None, models: tuple[str, ...], type_map_file: str | None, fmt: str) -> None:
    """Open answers: accuracy and mean VQA score per run, answer type, question type (and tag)."""
    from vrp.analysis.type_map import tag_metrics

    lake = open_existing_lake(lake_dir)
    type_map = _type_map(type_map_file)
    with user_errors(LakeError):
        rows = [r for r in data.query(lake, "vqa_metrics").to_pylist() if not models or r["model"] in models]
    if not rows:
        raise click.ClickException("no open-answer runs in the lake (ingest --dataset vqav2 or shapes-vqa)")
    shown = [r for r in rows if r["level"] != "question_type" or type_map is None]
    if fmt != "table":
        tagged = [] if type_map is None else [{**r, "level": "tag"} for r in tag_metrics(rows, type_map)]
        _emit_records(fmt, [*shown, *tagged])
        return
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


def _margin_records(m: compute.ModelMargins) -> list[dict]:
    c = m.curves
    locked = m.lock_in[m.lock_in >= 0]
    out = []
    for j, layer in enumerate(c.layers):
        h = m.entropy
        out.append(
            {
                "model": m.model,
                "layer": int(layer),
                "margin_correct": c.mean_correct[j],
                "margin_incorrect": c.mean_incorrect[j],
                "separation": c.separation[j],
                "auroc": c.auroc[j],
                "locked_in_share": float((locked <= layer).sum()) / max(m.lock_in.size, 1),
                "spatial_entropy": None if h is None else h.mean[j],
                "spatial_entropy_delta": None if h is None or j == 0 else h.delta[j],
                "n_correct": c.n_correct,
                "n_incorrect": c.n_incorrect,
                "max_separation_layer": m.max_separation,
            }
        )
    return out


@analyze.command()
@lake_option
@models_option
@click.option(
    "--condition",
    "conditions",
    multiple=True,
    type=click.Choice(["none", "blank", "noise", "mismatch"]),
    help="Only this condition (repeatable; default: every condition run in the lake).",
)
@boot_option
@seed_of_folds
@output_format
def attribution(
    lake_dir: str | None,
    models: tuple[str, ...],
    conditions: tuple[str, ...],
    n_boot: int,
    seed: int,
    fmt: str,
) -> None:
    """Visual attribution: per layer, the image run's truth margin minus each condition run's.

    Per model and condition: the mean Δ truth margin per layer for all, correct and wrong answers
    (bootstrap 95% CIs), the peak visual layer (largest mean Δ), the MLP share of the image run's
    direct contributions at the peak and over the boosting / suppression / all layers, the answer
    flip rate, the mean first-token KL(image || condition) and the share of answers unchanged
    without the image, per split. Needs condition runs (`vrp ingest run --image-condition blank`).
    """
    from vrp.analysis import attribution as attr

    lake = open_existing_lake(lake_dir)
    try:
        found = attr.attributions(
            lake, models=models or None, conditions=conditions or None, n_boot=n_boot, seed=seed
        )
    except (LakeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not found:
        raise click.ClickException(
            "no condition runs with scored image answers in the lake: run `vrp ingest run "
            "--image-condition blank` (or none, noise, mismatch) with the options of an image run first"
        )
    if fmt == "json":
        click.echo(
            json.dumps(
                [
                    {
                        **{k: _plain(v) for k, v in a.summary().items()},
                        "layers": [{k: _plain(v) for k, v in r.items()} for r in a.rows()],
                    }
                    for a in found
                ],
                indent=1,
            )
        )
        return
    if fmt == "csv":
        _emit_records(fmt, [{**a.summary(), **r} for a in found for r in a.rows()])
        return
    t = rendering.attribution_table(found)
    _print_table(t.header, t.rows)
    click.echo(f"\n{t.note}")
    for a in found:
        click.echo(f"\n{a.model}, image - {a.condition}: mean Δ truth margin by layer (peak {a.peak})")
        rows = []
        for j, layer in enumerate(a.layers.tolist()):
            cells = [str(layer) + (" *" if layer == a.peak else "")]
            for group in attr.GROUPS:
                d = a.delta[group]
                cells.append(f"{d.mean[j]:+.3f} [{d.low[j]:+.3f}, {d.high[j]:+.3f}]" if d.n else "-")
            rows.append(cells)
        _print_table(["layer", *(f"{g} (n={a.delta[g].n})" for g in attr.GROUPS)], rows)


@analyze.command()
@lake_option
@models_option
@boot_option
@seed_of_folds
@click.option(
    "--contrib-layer",
    "contrib_layers",
    multiple=True,
    type=int,
    metavar="L",
    help="Layer(s) whose attention and MLP direct contributions feed the logit-contribution model "
    "(repeatable; negative counts from the end; default: the last 6 layers).",
)
@output_format
def fusion(
    lake_dir: str | None,
    models: tuple[str, ...],
    n_boot: int,
    seed: int,
    contrib_layers: tuple[int, ...],
    fmt: str,
) -> None:
    """Held-out fused reliability score and logit-contribution model, per image run.

    Fusion: logistic regression on z-scored -H_s, C_k, first-token probability, self-consistency,
    visual dependence (when condition runs exist) and the best probe's out-of-fold score. Logit
    contributions: the attention and MLP direct contributions to the truth logit at the chosen
    layers. Both are scored out of fold on the probes' image-grouped folds with the scaler fitted
    inside each training fold: AUROC [bootstrap 95% CI] and the coefficients of a fit on all rows.
    """
    from vrp.analysis import fusion as fusion_mod

    lake = open_existing_lake(lake_dir)
    try:
        fits, skipped = fusion_mod.run_fusions(
            lake, models=models or None, contrib_layers=contrib_layers or None, seed=seed, n_boot=n_boot
        )
    except (LakeError, ProbeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    for note in skipped:
        click.echo(note, err=True)
    if not fits:
        raise click.ClickException("no image run with scored answers of both outcomes in the lake")
    if fmt != "table":
        _emit_records(fmt, [f.row() for f in fits])
        return
    t = rendering.fusion_table(fits)
    _print_table(t.header, t.rows)
    click.echo(f"\n{t.note}")
    for f in fits:
        click.echo(f"\n{f.model} {f.name} (run {f.run_id}): coefficients per standard deviation")
        _print_table(["feature", "coefficient"], [[k, f"{v:+.3f}"] for k, v in f.coefficients.items()])


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
@click.option(
    "--view",
    "view_dir",
    default=None,
    metavar="DIR",
    help="A `vrp view` folder: rows naming a sample (the most confident wrong answers) link to its page.",
)
@boot_option
@seed_of_folds
@type_map_option
def report(
    lake_dir: str | None,
    out_dir: str,
    force: bool,
    view_dir: str | None,
    n_boot: int,
    seed: int,
    type_map_file: str | None,
) -> None:
    """Markdown + self-contained HTML report of the study's tables and figures (reads the lake only).

    Each task gets its section: POPE metrics for yes/no runs, VQA metrics for open-answer runs.
    With --view, rows that name a sample link to its page in that `vrp view` folder.
    """
    lake = open_existing_lake(lake_dir)
    type_map = _type_map(type_map_file)
    try:
        outcome = rendering.write_report(
            lake.root,
            out_dir,
            force=force,
            n_boot=n_boot,
            seed=seed,
            type_map=type_map,
            view=view_dir,
        )
    except (LakeError, ProbeError, ValueError, OSError) as exc:
        raise click.ClickException(f"report failed: {damaged_file_error(exc) or exc}") from exc
    click.echo(outcome.message)
