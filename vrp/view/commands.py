"""`vrp view`: write the static per-sample viewer of the lake into a folder."""

from __future__ import annotations

import json
import sys

import click

from vrp.cli.options import format_option, lake_option, open_existing_lake, user_errors


@click.command()
@lake_option
@click.option("--run", "run_id", help="Only this run (run_id of an image run).")
@click.option("--model", help="Only this model (the `model` column).")
@click.option(
    "--where",
    metavar="SQL",
    help='A SQL predicate over the samples\' columns, e.g. "correct = false AND p_yes > 0.9"; '
    "run read-only, like `vrp query`.",
)
@click.option(
    "--limit", type=click.IntRange(min=1), help="At most N samples (in model, run, question order)."
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    metavar="DIR",
    help="Output folder (a new folder, or a previous view: replaced).",
)
@format_option("text", "json", default="text", help="json: one line a pipeline can read.")
def view(
    lake_dir: str | None,
    run_id: str | None,
    model: str | None,
    where: str | None,
    limit: int | None,
    out_dir: str,
    fmt: str,
) -> None:
    """Write a static viewer of the lake: an index of samples and a page per sample.

    Each page shows the image as the model saw it with the attention map over the patch grid (a
    layer slider, the layer mean, per-head rows), the logit-lens evidence map beside it, the truth
    margin by layer (with other conditions' curves), first-token statistics, the K sampled answers
    and what each intervention did. No server and no network: open DIR/index.html from disk.
    """
    from tqdm.auto import tqdm

    from vrp.lake import LakeError
    from vrp.view.build import write_view

    lake = open_existing_lake(lake_dir)
    show = sys.stderr.isatty() and fmt == "text"
    with user_errors(LakeError, OSError):
        summary = write_view(
            lake,
            out_dir,
            run=run_id,
            model=model,
            where=where,
            limit=limit,
            progress=lambda rows: tqdm(rows, desc="view", unit="sample", disable=not show),
        )
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "index": str(summary.out / "index.html"),
                    "samples": summary.samples,
                    "images": summary.images,
                    "missing_images": summary.missing_images,
                    "conditions": summary.conditions,
                    "interventions": summary.interventions,
                    "bytes": summary.bytes,
                }
            )
        )
    else:
        click.echo(summary.line())
