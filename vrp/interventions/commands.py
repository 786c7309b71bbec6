"""`vrp intervene`: one command per intervention kind (also reachable as `vrp ingest intervene`).

Each command builds its kind's plan (every prerequisite read from the lake and checked, no model
loaded), then runs it through :func:`vrp.interventions.base.run_intervention` and prints the
summary. Heavy imports happen inside the commands, so `vrp --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import click

from vrp.cli.options import (
    batch_size_option,
    device_option,
    format_option,
    lake_option,
    open_existing_lake,
    parse_float_list,
    seed_option,
)


def _intervention_options(command: Callable[..., None]) -> Callable[..., None]:
    """Options every `vrp intervene` command shares (base run, model, data, batching, lake, output)."""
    options = [
        click.option("--base-run", required=True, help="run_id of the `vrp ingest run` to intervene on."),
        click.option("--model", help="Checkpoint to load (default: the base run's own model source)."),
        batch_size_option(default=8),
        device_option,
        click.option(
            "--data-dir", type=click.Path(file_okay=False), help="Base run's shapes-POPE folder, if moved."
        ),
        click.option("--pope-file", type=click.Path(dir_okay=False), help="Base run's POPE file, if moved."),
        click.option(
            "--image-dir", type=click.Path(file_okay=False), help="Base run's POPE images, if moved."
        ),
        lake_option,
        format_option(
            "text",
            "json",
            default="text",
            help="json: the summary as one JSON object on stdout (progress lines go to stderr).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _summary_json(summary: Any) -> str:
    record = dataclasses.asdict(summary)
    record["conditions"] = [
        {"condition": condition, "level": level, **dataclasses.asdict(tally)}
        for (condition, level), tally in sorted(summary.tally.items())
    ]
    del record["tally"]
    return json.dumps(record, sort_keys=True)


def _run_plan(make_plan: Callable[[Any], Any], params: dict[str, Any]) -> None:
    """Build the plan (every prerequisite checked, no model loaded), then run it and print the summary."""
    from vrp.interventions.base import InterventionError, run_intervention

    as_json = params["fmt"] == "json"
    echo = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    lake = open_existing_lake(params["lake_dir"])
    try:
        plan = make_plan(lake)
        summary = run_intervention(
            plan,
            lake.root,
            model=params["model"],
            device=params["device"],
            batch_size=params["batch_size"],
            data_dir=params["data_dir"],
            pope_file=params["pope_file"],
            image_dir=params["image_dir"],
            echo=echo,
        )
    except (InterventionError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(_summary_json(summary))
        return
    for line in summary.lines():
        click.echo(line)


@click.group()
def intervene() -> None:
    """Causal interventions on a base run: each writes a run of its own to `interventions`.

    \b
    mask      grey out the most / least attended or random patches
    ablate    zero or mean-replace the top-k probe neurons of a layer's MLP output
    destroy   zero a growing share of a layer's MLP output coordinates
    patch     copy a rightly answered donor's activations into a wrong recipient
    knockout  cut the answer's (or all text's) attention to the image in windows of layers

    Inputs come from the lake (the base run's answers and attention maps, the probe neurons of
    `vrp analyze probes`); every prerequisite is checked before the model is loaded, and a rerun
    of the same setting writes nothing.
    """


@intervene.command("mask")
@_intervention_options
@seed_option(default=0, help="Seed of the random patches.")
@click.option(
    "--ratio", default=0.3, show_default=True, type=float, help="Share of patches to grey out, in (0, 1)."
)
@click.option(
    "--conditions",
    default="full,high,low,random",
    show_default=True,
    help="full (no mask), high / low (most / least attended patches), random (seeded).",
)
@click.option(
    "--layer", default=-1, show_default=True, type=int, help="Layer whose stored map ranks the patches."
)
def intervene_mask(**params: Any) -> None:
    """Grey out (RGB 128) the most / least attended or random patches and re-answer.

    Masking happens on the preprocessed pixel values (in the processor's normalisation), so
    exactly the pixels of the chosen patches change, Qwen2-VL's merged patches included. Per
    sample, `high` minus `full` of the first-token entropy and truth margin is a reliability
    signal of its own (`vrp query --name mask_detector`).
    """
    from vrp.interventions.mask import plan_mask

    conditions = [c.strip() for c in str(params["conditions"]).split(",") if c.strip()]
    _run_plan(
        lambda lake: plan_mask(
            lake,
            str(params["base_run"]),
            ratio=float(params["ratio"]),
            conditions=conditions,
            layer=int(params["layer"]),
            seed=int(params["seed"]),
        ),
        params,
    )


@intervene.command("ablate")
@_intervention_options
@seed_option(default=0, help="Seed of the random control.")
@click.option(
    "--layer", required=True, type=int, help="Decoder layer whose MLP output is edited (-1 = last)."
)
@click.option(
    "--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Probe neurons to ablate."
)
@click.option(
    "--mode",
    type=click.Choice(["zero", "mean"]),
    default="zero",
    show_default=True,
    help="mean = the coordinate's mean MLP output at the answer position over the base run.",
)
@click.option(
    "--control",
    type=click.Choice(["random", "none"]),
    default="random",
    show_default=True,
    help="random: k other coordinates drawn with --seed.",
)
def intervene_ablate(**params: Any) -> None:
    """Zero or mean-replace the top-k L1 probe neurons of a layer's MLP output at every position."""
    from vrp.interventions.ablate import plan_ablate

    _run_plan(
        lambda lake: plan_ablate(
            lake,
            str(params["base_run"]),
            layer=int(params["layer"]),
            top_k=int(params["top_k"]),
            mode=str(params["mode"]),
            control=str(params["control"]),
            seed=int(params["seed"]),
        ),
        params,
    )


@intervene.command("destroy")
@_intervention_options
@seed_option(default=0, help="Seed of the random order.")
@click.option("--layer", required=True, help="Decoder layer (-1 = last) or 'peak' (best probe layer).")
@click.option(
    "--fractions",
    default="0.05,0.1,0.25,0.5,0.75",
    show_default=True,
    help="Shares of the MLP output coordinates to zero.",
)
@click.option(
    "--order",
    type=click.Choice(["probe", "random"]),
    default="probe",
    show_default=True,
    help="probe: the L2 probe's |coefficient| order; random: a permutation drawn with --seed.",
)
def intervene_destroy(**params: Any) -> None:
    """Zero a growing share of a layer's MLP output coordinates and re-answer (the destruction sweep)."""
    from vrp.interventions.destroy import plan_destroy

    layer_text = str(params["layer"]).strip()
    if layer_text != "peak":
        try:
            layer: int | str = int(layer_text)
        except ValueError as exc:
            raise click.BadParameter("expected an integer or 'peak'", param_hint="--layer") from exc
    else:
        layer = "peak"
    fractions = parse_float_list(str(params["fractions"]), param_hint="--fractions")
    _run_plan(
        lambda lake: plan_destroy(
            lake,
            str(params["base_run"]),
            layer=layer,
            fractions=fractions,
            order=str(params["order"]),
            seed=int(params["seed"]),
        ),
        params,
    )


@intervene.command("patch")
@_intervention_options
@seed_option(default=0, help="Seed of the donor draw (counterfactual and random pairs).")
@click.option(
    "--site",
    type=click.Choice(["resid", "attn_out", "mlp_out"]),
    default="resid",
    show_default=True,
    help="resid: the decoder layer's output; attn_out / mlp_out: its attention / MLP output.",
)
@click.option(
    "--layers",
    default="all",
    show_default=True,
    help="Layers patched one at a time: 'all', or e.g. '0-3,8,-1' (negative counts from the end).",
)
@click.option(
    "--positions",
    type=click.Choice(["answer", "image", "all"]),
    default="answer",
    show_default=True,
    help="answer: the last prompt token; image: every image token (same count needed); "
    "all: every prompt position (same prompt length needed).",
)
@click.option(
    "--pairs",
    default="counterfactual",
    show_default=True,
    help="counterfactual: each wrong answer gets a right one of the same dataset, split and label "
    "(same image, else same object, preferred); random: any right one (seeded); or a CSV file "
    "with the header recipient_sample_id,donor_sample_id.",
)
def intervene_patch(**params: Any) -> None:
    """Activation patching: write a donor's activations into a recipient, one layer at a time.

    The donors run once per batch (their site output recorded at every layer), then every
    recipient is answered unpatched (`full`) and once per layer with its own donor's vectors.
    Rows carry `donor_sample_id` and `restoration`, the share of the gap between the recipient's
    and the donor's truth margins that the patch closes (1 = fully restored).
    """
    from vrp.interventions.patch import plan_patch

    _run_plan(
        lambda lake: plan_patch(
            lake,
            str(params["base_run"]),
            site=str(params["site"]),
            layers=str(params["layers"]),
            positions=str(params["positions"]),
            pairs=str(params["pairs"]),
            seed=int(params["seed"]),
        ),
        params,
    )


@intervene.command("knockout")
@_intervention_options
@click.option(
    "--layers",
    default="all",
    show_default=True,
    help="Windows of layers, each one condition: e.g. '0-3,4-7'; 'all' = one window per layer.",
)
@click.option(
    "--from",
    "source",
    type=click.Choice(["answer", "text"]),
    default="answer",
    show_default=True,
    help="answer: the answer position (and the generated tokens); text: every text position.",
)
def intervene_knockout(**params: Any) -> None:
    """Block attention to the image tokens in windows of layers and re-answer.

    The entries are removed from the attention mask the model builds itself, so SDPA stays the
    kernel. Where accuracy and the truth margin fall is where image information flows in.
    """
    from vrp.interventions.knockout import plan_knockout

    _run_plan(
        lambda lake: plan_knockout(
            lake, str(params["base_run"]), layers=str(params["layers"]), source=str(params["source"])
        ),
        params,
    )
