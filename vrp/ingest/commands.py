"""Command-line commands of the ingest room: ``vrp data`` (datasets) and ``vrp toy`` (toy zoo).

Heavy imports (torch, transformers) happen inside the commands, so ``vrp --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from vrp.cli.options import (
    LazyChoice,
    batch_size_option,
    device_option,
    lake_option,
    lake_root,
    parse_bytes,
    parse_int_list,
    parse_shard,
    seed_option,
    user_errors,
)


@click.group()
def data() -> None:
    """Make and inspect datasets (POPE-format yes/no and VQAv2-format open questions)."""


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
@seed_option(default=1234, help="Generator seed; use a seed no toy model was trained on for evaluation.")
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


@data.command("shapes-vqa")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write (replaced if it already holds a shapes-VQA set).",
)
@click.option("--images", default=60, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@seed_option(default=4321, help="Generator seed; use a seed no toy model was trained on for evaluation.")
@click.option(
    "--image-size", default=80, show_default=True, type=click.IntRange(min=32), help="Side in pixels."
)
def shapes_vqa(out_dir: Path, images: int, seed: int, image_size: int) -> None:
    """Write synthetic open questions (color, count, shape, content, yes/no) in the VQAv2 file layout.

    Read it with `vrp ingest run --dataset shapes-vqa --data-dir OUT`, or as VQAv2 with
    --questions-file/--annotations-file/--image-dir.
    """
    from vrp.ingest.datasets import generate_shapes_vqa, load_dataset

    with user_errors(FileExistsError, ValueError, RuntimeError):
        folder = generate_shapes_vqa(out_dir, images=images, seed=seed, image_size=image_size)
    samples, _ = load_dataset("shapes-vqa", data_dir=folder)
    types = sorted({s.answer_type for s in samples if s.answer_type})
    counts = ", ".join(f"{t} {sum(s.answer_type == t for s in samples)}" for t in types)
    click.echo(f"wrote {images} images and {len(samples)} questions to {folder} (answer types: {counts})")


@click.group()
def ingest() -> None:
    """Run a model over a benchmark once and write every signal into the lake."""


@ingest.command("run")
@click.option(
    "--model", required=True, help="Registry name (toy-llava, llava-1.5-7b, ...), local directory or hub id."
)
@click.option(
    "--dataset",
    type=click.Choice(["shapes-pope", "pope", "vqav2", "shapes-vqa"]),
    default="shapes-pope",
    show_default=True,
    help="Yes/no (shapes-pope, pope) or open-ended (vqav2, shapes-vqa) questions.",
)
@click.option(
    "--split", type=click.Choice(["random", "popular", "adversarial"]), help="One split (default: all)."
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="A shapes-POPE or shapes-VQA folder (default: generated).",
)
@click.option(
    "--pope-file",
    type=click.Path(dir_okay=False),
    help="POPE questions: JSON lines or array, lmms-eval .parquet or VLMEvalKit .tsv (images embedded).",
)
@click.option("--image-dir", type=click.Path(file_okay=False), help="Folder of the POPE or COCO images.")
@click.option(
    "--questions-file", type=click.Path(dir_okay=False), help="VQAv2 questions JSON (official layout)."
)
@click.option(
    "--annotations-file",
    type=click.Path(dir_okay=False),
    help="VQAv2 annotations JSON; without it answers are stored, not scored (test-dev).",
)
@click.option(
    "--data-file",
    type=click.Path(dir_okay=False),
    help="One data file with embedded images: VQAv2 Parquet (Hugging Face layout).",
)
@click.option(
    "--question-ids",
    "question_ids_file",
    type=click.Path(dir_okay=False),
    help="File of question ids, one a line: only those questions.",
)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    help="Only N questions, drawn with --seed and stratified by answer type.",
)
@click.option(
    "--prompt-template",
    help="Question template with {question}, e.g. '{question} Answer briefly.' (default: the dataset's).",
)
@click.option(
    "--correct",
    "correct_rule",
    type=click.Choice(["lenient", "exact", "vqa"]),
    default="lenient",
    show_default=True,
    help="Open answers: lenient (substring of the main answer, the study's), exact, or vqa (score >= 0.5).",
)
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N questions.")
@batch_size_option(default=8)
@click.option("--layers", help="Layers whose hidden states and maps are stored, e.g. '-1,-2' (default: all).")
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True
)
@device_option
@click.option("--max-new-tokens", default=8, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--self-consistency",
    "k",
    default=10,
    show_default=True,
    type=click.IntRange(min=0),
    help="K samples; 0 = off.",
)
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--top-p", default=0.9, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@seed_option(default=0, help="Base seed of the self-consistency draws and of --sample.")
@click.option(
    "--min-pixels", type=click.IntRange(min=1), help="Qwen2-VL: lower bound on the resized image area."
)
@click.option(
    "--max-pixels", type=click.IntRange(min=1), help="Qwen2-VL: upper bound on the resized image area."
)
@click.option(
    "--max-bytes", default="50GiB", show_default=True, help="Refuse runs estimated larger than this."
)
@click.option("--yes", "assume_yes", is_flag=True, help="Write even when the estimate exceeds --max-bytes.")
@click.option("--strict", is_flag=True, help="Stop at the first failed sample instead of recording it.")
@click.option("--shard", default="1/1", show_default=True, help="Process shard I of N (for job arrays).")
@click.option(
    "--force",
    is_flag=True,
    help="Write even while the run looks held by another live ingest (use only when that one is dead).",
)
@click.option(
    "--no-evidence",
    is_flag=True,
    help="Skip the logit-lens evidence maps (truth logit minus the mean logit at every image position, "
    "per stored layer; computed in the same forward pass, stored beside attention_maps).",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: --workers Ray actors, one model replica each (pip install 'vrp[ray]').",
)
@click.option(
    "--workers", default=2, show_default=True, type=click.IntRange(min=1), help="Ray: shards, one actor each."
)
@click.option(
    "--gpus-per-worker",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Ray: GPUs per actor (the model then runs on cuda).",
)
@click.option(
    "--cpus-per-worker",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Ray: CPUs per actor (fractions allowed).",
)
@click.option("--address", default=None, help="Ray: address of a running cluster (default: start one here).")
@click.option(
    "--image-condition",
    type=click.Choice(["image", "none", "blank", "noise", "mismatch"]),
    default="image",
    show_default=True,
    help="What the model sees instead of each question's image: none (text only; LLaVA and Qwen2-VL), "
    "blank (grey, same size), noise (VCD's forward diffusion), mismatch (another question's image). "
    "A condition run needs the image run of the same options in the lake and joins it by sample_id.",
)
@click.option(
    "--noise-steps",
    default=500,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="noise: diffusion steps t of the 1,000-step linear schedule.",
)
@click.option(
    "--condition-seed",
    default=0,
    show_default=True,
    type=int,
    help="noise: seed of the per-sample noise; mismatch: seed of the image permutation.",
)
@lake_option
def ingest_run(**params: object) -> None:
    """Capture hidden states, image attention, logit lens, answers and K samples into the lake.

    A rerun of the same configuration adds nothing; an interrupted run resumes where it stopped.
    """
    from vrp.ingest.run import IngestError, IngestOptions, run_ingest
    from vrp.lake import LakeError

    lake = lake_root(params.pop("lake_dir"))
    question_ids = None
    if params["question_ids_file"]:
        from vrp.ingest.datasets import read_question_ids
        from vrp.ingest.datasets.vqav2 import VqaFormatError

        with user_errors(VqaFormatError):
            question_ids = tuple(read_question_ids(str(params["question_ids_file"])))
    options = IngestOptions(
        model=params["model"],
        dataset=params["dataset"],
        split=params["split"],
        data_dir=params["data_dir"],
        pope_file=params["pope_file"],
        image_dir=params["image_dir"],
        limit=params["limit"],
        batch_size=params["batch_size"],
        layers=parse_int_list(params["layers"], param_hint="--layers"),
        dtype=params["dtype"],
        device=params["device"],
        max_new_tokens=params["max_new_tokens"],
        self_consistency=params["k"],
        temperature=params["temperature"],
        top_p=params["top_p"],
        seed=params["seed"],
        min_pixels=params["min_pixels"],
        max_pixels=params["max_pixels"],
        strict=params["strict"],
        max_bytes=parse_bytes(str(params["max_bytes"])),
        shard=parse_shard(str(params["shard"])),
        correct_rule=str(params["correct_rule"]),
        questions_file=params["questions_file"],
        annotations_file=params["annotations_file"],
        data_file=params["data_file"],
        question_ids=question_ids,
        sample=params["sample"],
        prompt_template=params["prompt_template"],
        force=bool(params["force"]),
        image_condition=str(params["image_condition"]),
        noise_steps=int(params["noise_steps"]),
        condition_seed=int(params["condition_seed"]),
        evidence=not params["no_evidence"],
    )
    embedded = str(options.pope_file or "").lower().endswith((".parquet", ".tsv"))
    if options.dataset == "pope" and not (options.pope_file and (options.image_dir or embedded)):
        raise click.UsageError(
            "--dataset pope needs --pope-file and --image-dir (a .parquet or .tsv file embeds its images)"
        )
    engine = params["engine"]
    if engine == "local" and (params["address"] or params["gpus_per_worker"]):
        raise click.UsageError("--address and --gpus-per-worker need --engine ray")
    try:
        if engine == "ray":
            from vrp.ingest.ray_engine import run_ray_ingest

            summary = run_ray_ingest(
                options,
                lake,
                workers=int(params["workers"]),
                gpus_per_worker=float(params["gpus_per_worker"]),
                cpus_per_worker=float(params["cpus_per_worker"]),
                address=params["address"],
                echo=click.echo,
                confirm_bytes=bool(params["assume_yes"]),
            )
        else:
            summary = run_ingest(options, lake, echo=click.echo, confirm_bytes=bool(params["assume_yes"]))
    except (IngestError, LakeError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    for line in summary.lines():
        click.echo(line)


def _toy_families() -> tuple[str, ...]:
    from vrp.ingest.models.registry import toy_families

    return toy_families()


@click.group()
def toy() -> None:
    """Train the toy models: tiny real-class VLMs that learn shapes-POPE on a CPU."""


@toy.command("train")
@click.option(
    "--family",
    required=True,
    type=LazyChoice(_toy_families),
    help="A family with a toy (the family registry).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Checkpoint folder to write (safetensors, processor, tokenizer, card.json).",
)
@click.option(
    "--minutes",
    default=15.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Wall-clock budget; the step count is fixed from the measured pace (see below).",
)
@click.option(
    "--steps",
    default=None,
    type=click.IntRange(min=1),
    help="Exact number of steps (overrides --minutes; reproduces a card's run).",
)
@seed_option(default=0, help="Model initialisation and training data seed.")
@click.option(
    "--decay-start",
    default=None,
    type=click.IntRange(min=0),
    help="Step where the learning rate starts to decay (with --steps; a card records it).",
)
@batch_size_option(default=64)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Torch CPU threads (results are deterministic for a given thread count).",
)
@click.option(
    "--init-from",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Warm-start from a trained toy's folder (e.g. vrp/toys/toy-llava) instead of random weights.",
)
@click.option(
    "--vqa-share",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0.0, max=1.0, max_open=True),
    help="Share of each batch asking shapes-VQA open questions (the rest: shapes-POPE and captions).",
)
@click.option(
    "--lr",
    default=2e-3,
    show_default=True,
    type=click.FloatRange(min=0.0, min_open=True),
    help="Peak learning rate (the shipped toys' warm starts used 1e-3).",
)
@click.option(
    "--warmup-steps", default=50, show_default=True, type=click.IntRange(min=1), help="Linear warm-up."
)
@click.option(
    "--evals", default=5, show_default=True, type=click.IntRange(min=1), help="Held-out evaluations per run."
)
@click.option(
    "--checkpoint-minutes",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Save the weights this often, so a run cut short leaves a model (checkpoint.json says where).",
)
def toy_train(
    family: str,
    out_dir: Path,
    minutes: float,
    steps: int | None,
    seed: int,
    decay_start: int | None,
    batch_size: int,
    threads: int,
    init_from: Path | None,
    vqa_share: float,
    lr: float,
    warmup_steps: int,
    evals: int,
    checkpoint_minutes: float,
) -> None:
    """Train one toy model on freshly generated shapes-POPE and save it with its card.

    With --minutes the learning rate stays constant until 30% of the budget is left, then decays
    over the step count the measured pace allows; the card records both numbers, and
    `--steps N --decay-start D` with the same seed and --threads reproduces the weights exactly.
    With --init-from and --vqa-share the toy learns shapes-VQA's open questions on top of what it
    knows; the card records the source toy, the mix, the added words and the accuracy per question type.
    """
    from transformers.utils import logging as hf_logging

    from vrp.toys.train import ToyTrainConfig, train_toy

    hf_logging.disable_progress_bar()  # our own bar and log lines only

    try:
        cfg = ToyTrainConfig(
            family=family,
            seed=seed,
            minutes=None if steps else minutes,
            steps=steps,
            decay_start=decay_start,
            batch_size=batch_size,
            threads=threads,
            init_from=None if init_from is None else str(init_from),
            vqa_share=vqa_share,
            lr=lr,
            warmup_steps=warmup_steps,
            evals=evals,
            checkpoint_minutes=checkpoint_minutes,
        )
        card = train_toy(cfg, out_dir, log=click.echo)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    accuracy = ", ".join(f"{split} {acc:.3f}" for split, acc in card["evaluation"]["accuracy"].items())
    click.echo(
        f"saved {card['name']} to {out_dir} after {card['training']['steps']} steps "
        f"({card['training']['minutes']:.1f} min): held-out accuracy {accuracy}"
    )
    if "vqa" in card["evaluation"]:
        click.echo(
            f"shapes-VQA held-out accuracy ({card['evaluation']['vqa']['rule']}): "
            f"{card['evaluation']['vqa']['accuracy']:.3f}"
        )
