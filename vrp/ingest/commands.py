"""Command-line commands of the ingest room: ``vrp data`` (datasets) and ``vrp toy`` (toy zoo).

Heavy imports (torch, transformers) happen inside the commands, so ``vrp --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def data() -> None:
    """Make and inspect datasets (POPE-format yes/no object questions)."""


@data.command("shapes-pope")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write (replaced if it already holds a shapes-POPE set).",
)
@click.option(
    "--images", default=100, show_default=True, type=click.IntRange(min=1), help="Number of images."
)
@click.option(
    "--seed",
    default=1234,
    show_default=True,
    type=int,
    help="Generator seed; use a seed no toy model was trained on for evaluation.",
)
@click.option(
    "--image-size", default=80, show_default=True, type=click.IntRange(min=32), help="Side in pixels."
)
def shapes_pope(out_dir: Path, images: int, seed: int, image_size: int) -> None:
    """Write a synthetic shapes-POPE benchmark: random/popular/adversarial.jsonl, images/, boxes.json."""
    from vrp.ingest.datasets import SPLITS, generate_shapes_pope

    try:
        folder = generate_shapes_pope(out_dir, images=images, seed=seed, image_size=image_size)
    except (FileExistsError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    counts = []
    for split in SPLITS:
        with open(folder / f"{split}.jsonl", encoding="utf-8") as handle:
            counts.append(f"{split} {sum(1 for _ in handle)}")
    click.echo(f"wrote {images} images to {folder} (questions: {', '.join(counts)})")
