"""dataset x model -> batches -> rows -> one lake commit per group of batches.

The run is resumable by construction: its ``run_id`` hashes everything that changes the numbers,
the writer reports which samples already have a committed ``samples`` row, and only the others
are processed. A bad sample (unreadable image, bad label, NaN in its activations) goes to
``failures`` with its stage and reason; the run goes on and reports it at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import vrp
from vrp.ingest.answers import majority_answer
from vrp.ingest.capture import ATTENTION_BACKEND, BatchCapture, capture_batch
from vrp.ingest.conditions import Condition
from vrp.ingest.generate import sample_seed
from vrp.ingest.models.base import LayerRangeError, resolve_layer
from vrp.ingest.prompts import apply_template, question_template
from vrp.lake.identity import make_run_id
from vrp.lake.images import image_hash, image_row
from vrp.runs.loop import BatchOutcome, run_loop
from vrp.tasks import DEFAULT_CORRECT_RULE, Task, TaskError, get_task

if TYPE_CHECKING:
    from PIL import Image

    from vrp.ingest.datasets import Sample, SampleError
    from vrp.ingest.models.base import Adapter
    from vrp.lake import Lake

HIDDEN_SITES = ("resid", "mlp_out")


class IngestError(RuntimeError):
    """A run that cannot start or must stop; the message says what to do."""


@dataclass(frozen=True)
class IngestOptions:
    """Everything a user can set on `vrp ingest run`. Fields marked hashed change the run_id."""

    model: str
    dataset: str = "shapes-pope"
    split: str | None = None
    data_dir: str | None = None
    pope_file: str | None = None
    image_dir: str | None = None
    limit: int | None = None
    batch_size: int = 8
    layers: tuple[int, ...] | None = None  # which layers' hidden states and maps to store; None = all
    dtype: str = "float32"
    device: str = "cpu"
    max_new_tokens: int = 8
    self_consistency: int = 10
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    min_pixels: int | None = None
    max_pixels: int | None = None
    commit_samples: int = 256  # samples per lake commit: large enough that files are not tiny
    strict: bool = False
    max_bytes: int = 50 * 2**30
    shard: tuple[int, int] = (0, 1)
    correct_rule: str = DEFAULT_CORRECT_RULE  # hashed (open answers): how `correct` is decided
    questions_file: str | None = None  # VQAv2 official questions JSON
    annotations_file: str | None = None  # VQAv2 official annotations JSON (optional)
    data_file: str | None = None  # one data file with embedded images (VQAv2 Parquet, ...)
    question_ids: tuple[str, ...] | None = None  # only these questions (e.g. the study's 1,000)
    sample: int | None = None  # this many questions, seeded by `seed`, stratified by answer type
    prompt_template: str | None = None  # the question template; None = the dataset's default
    force: bool = False  # write even while another live writer holds this run (it must be dead)
    image_condition: str = "image"  # image | none | blank | noise | mismatch (vrp.ingest.conditions)
    noise_steps: int = 500
    condition_seed: int = 0  # noise draws and the mismatch permutation
    evidence: bool = True  # logit-lens evidence maps on the patch grid (recorded, not hashed)


@dataclass
class IngestSummary:
    """What a run did, for the final report on the terminal and for tests."""

    run_id: str
    model: str
    total: int
    skipped_done: int
    written: int = 0
    task: Task | None = None  # says what the answers' summary lines report
    # per written sample: answer, parse_status, correct, score, answer_type (the summary's inputs)
    answers: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[str, str, str]] = field(
        default_factory=list
    )  # (sample_id or question id, stage, error)
    estimated_bytes: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [
            f"run {self.run_id} ({self.model}): {self.written} new samples, "
            f"{self.skipped_done} already in the lake, {len(self.failures)} failed, {self.seconds:.1f}s",
        ]
        if self.task is not None:
            out.extend(self.task.summary_lines(self.answers))
        for ident, stage, error in self.failures[:20]:
            out.append(f"  failed [{stage}] {ident}: {error}")
        if len(self.failures) > 20:
            out.append(f"  ... and {len(self.failures) - 20} more (query the failures table)")
        return out


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """Layer indices counted from 0; negative ones count from the end (-1 is the last layer)."""
    if layers is None:
        return list(range(num_layers))
    try:
        return sorted({resolve_layer(layer, num_layers) for layer in layers})
    except LayerRangeError as exc:
        raise IngestError(str(exc)) from exc


def estimate_bytes(
    adapter: Adapter, n_samples: int, layers: Sequence[int], n_image_tokens: int, k: int
) -> int:
    """Uncompressed bytes the run will add: dominated by hidden states and attention maps."""
    per_sample = (
        len(HIDDEN_SITES) * len(layers) * adapter.hidden_size * 4
        + len(layers) * n_image_tokens * 4 * 2  # attention and evidence maps
        + adapter.num_layers * adapter.num_heads * 24
        + adapter.num_layers * 96
        + k * 64
        + 512
    )
    return n_samples * per_sample


def run_config(
    adapter: Adapter,
    options: IngestOptions,
    dataset_hash: str,
    layers: Sequence[int],
    task: Task,
    condition: Condition | None = None,
) -> dict[str, Any]:
    """Everything that changes the numbers: hashed into run_id (docs/ARCHITECTURE.md section 6).

    A condition run adds a ``condition`` entry; without it the config is its image run's, which is
    how a condition run finds its base run.
    """
    from vrp.schema import SCHEMA_VERSION

    config = {
        "model_source": adapter.source,
        "model_revision": adapter.revision,
        "dataset": options.dataset,
        "split": options.split or "all",
        "dataset_hash": dataset_hash,
        "limit": options.limit,
        "adapter": adapter.settings,
        "task": task.identity(adapter),
        "question_template": question_template(options.dataset, options.prompt_template),
        "sample": None if options.sample is None else {"n": options.sample, "seed": options.seed},
        "dtype": options.dtype,
        "decoding": {"max_new_tokens": options.max_new_tokens, "greedy": True},
        "self_consistency": {
            "k": options.self_consistency,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "seed": options.seed,
        },
        "capture": {"layers": list(layers), "attention": ATTENTION_BACKEND, "sites": list(HIDDEN_SITES)},
        "hidden_size": adapter.hidden_size,
        "schema_version": SCHEMA_VERSION,
    }
    if condition is not None:
        config["condition"] = condition.config()
    return config


def data_source(options: IngestOptions) -> dict[str, str | None]:
    """The dataset paths of a run as absolute paths (None where the default applies)."""
    return {
        key: None if value is None else str(Path(value).resolve())
        for key, value in (
            ("data_dir", options.data_dir),
            ("pope_file", options.pope_file),
            ("image_dir", options.image_dir),
            ("questions_file", options.questions_file),
            ("annotations_file", options.annotations_file),
            ("data_file", options.data_file),
        )
    }


@dataclass
class IngestPlan:
    """One run (one shard of it) resolved before anything is written.

    Splitting planning from execution lets a scale-out engine plan every shard first (checking
    that all workers agree on the run and summing the size estimate) and only then write.
    """

    options: IngestOptions
    adapter: Adapter
    task: Task
    layers: list[int]
    run_row: dict[str, Any]
    samples: list[Sample]  # this shard's questions
    load_errors: list[SampleError]  # questions that could not be read (recorded by shard 0 only)
    pending: int  # this shard's questions not yet committed
    estimated_bytes: int
    condition: Condition | None = None  # None for an image run

    @property
    def run_id(self) -> str:
        return str(self.run_row["run_id"])

    def describe(self) -> str:
        adapter = self.adapter
        return (
            f"run {self.run_id}: {self.pending} of {len(self.samples)} questions to ingest "
            f"with {adapter.name} "
            f"({adapter.num_layers} layers, hidden {adapter.hidden_size}); "
            f"about {self.estimated_bytes / 2**20:.1f} MiB before compression"
        )


def check_size(estimated_bytes: int, max_bytes: int) -> None:
    """Refuse a run whose size estimate is above --max-bytes (unless the user confirmed it)."""
    if estimated_bytes > max_bytes:
        raise IngestError(
            f"this run would write about {estimated_bytes / 2**30:.2f} GiB, above --max-bytes "
            f"({max_bytes / 2**30:.2f} GiB); store fewer layers with --layers, ingest fewer "
            "questions with --limit, or raise --max-bytes"
        )


def plan_ingest(options: IngestOptions, lake_root: str, *, adapter: Adapter | None = None) -> IngestPlan:
    """Load the questions (this shard's), the model unless `adapter` is given, and size the run.

    Reads only: nothing is written to the lake. The run id hashes the whole (unsharded) question
    set, so every shard of a run, and a local run of the same questions, share one run id.
    """
    from vrp.ingest.datasets import dataset_fingerprint, dataset_task, load_dataset
    from vrp.ingest.models import load_adapter
    from vrp.lake import open_lake

    samples, load_errors = load_dataset(
        options.dataset,
        data_dir=options.data_dir,
        split=options.split,
        pope_file=options.pope_file,
        image_dir=options.image_dir,
        questions_file=options.questions_file,
        annotations_file=options.annotations_file,
        data_file=options.data_file,
        question_ids=options.question_ids,
        sample=options.sample,
        sample_seed=options.seed,
    )
    if options.limit is not None:
        samples = samples[: options.limit]
    if not samples and not load_errors:
        raise IngestError(
            "the dataset has no questions to ingest (check --split, --limit and the data files)"
        )
    if not samples:
        first = load_errors[0]
        raise IngestError(
            f"no question could be read: all {len(load_errors)} rows were rejected "
            f"(first, question {first.question_id}: {first.error}); check the file's layout and --dataset"
        )
    fingerprint = dataset_fingerprint(samples)
    condition = _plan_condition(options, lake_root, samples, fingerprint)
    index, count = options.shard
    samples = [s for i, s in enumerate(samples) if i % count == index]
    if index != 0:
        load_errors = []  # one shard records them, so concurrent shards do not race to

    if adapter is None:
        adapter = load_adapter(
            options.model,
            dtype=options.dtype,
            device=options.device,
            min_pixels=options.min_pixels,
            max_pixels=options.max_pixels,
        )
    task = get_task(dataset_task(options.dataset), correct_rule=options.correct_rule)
    try:
        task.check(adapter)
    except TaskError as exc:
        raise IngestError(str(exc)) from exc
    layers = resolve_layers(options.layers, adapter.num_layers)
    config = run_config(adapter, options, fingerprint, layers, task, condition)
    run_id = make_run_id(config)
    run_row = {
        "run_id": run_id,
        "model": adapter.name,
        "model_source": adapter.source,
        "model_revision": adapter.revision,
        "family": adapter.spec.family,
        "dataset": options.dataset,
        "split": options.split or "all",
        "dtype": options.dtype,
        "device": options.device,
        "attention_backend": ATTENTION_BACKEND,
        "code_version": vrp.__version__,
        # where the questions were read from: recorded so interventions can re-find the samples,
        # but not hashed (a moved folder with the same files is the same run)
        "config": {**config, "data_source": data_source(options), "evidence_maps": options.evidence},
    }
    if condition is not None:
        condition.base_run_id = _find_base_run(open_lake(lake_root), config, run_row)
        run_row.update(kind=condition.name, base_run_id=condition.base_run_id)
    already = _committed_sample_ids(open_lake(lake_root), run_id)
    pending_ids = [s for s in samples if s.sample_id not in already]
    probe_tokens = 0 if condition and condition.text_only else _image_tokens_per_sample(adapter, pending_ids)
    estimated = estimate_bytes(adapter, len(pending_ids), layers, probe_tokens, options.self_consistency)
    return IngestPlan(
        options=options,
        adapter=adapter,
        task=task,
        layers=layers,
        run_row=run_row,
        samples=samples,
        load_errors=load_errors,
        pending=len(pending_ids),
        estimated_bytes=estimated,
        condition=condition,
    )


def _plan_condition(
    options: IngestOptions, lake_root: str, samples: Sequence[Any], fingerprint: str
) -> Condition | None:
    """The run's image condition, checked before any model loads: family support, the image run."""
    from vrp.ingest import conditions
    from vrp.ingest.datasets import dataset_task
    from vrp.lake import open_lake

    try:
        condition = conditions.make_condition(
            options.image_condition, samples, noise_steps=options.noise_steps, seed=options.condition_seed
        )
        if condition is None:
            return None
        if condition.text_only:
            conditions.check_text_only(options.model)
            if dataset_task(options.dataset) != "yesno":
                # an open answer's truth token is read in the context of its image
                raise conditions.ConditionError(
                    f"--image-condition none is available for yes/no datasets only, not {options.dataset}; "
                    "use --image-condition blank"
                )
    except conditions.ConditionError as exc:
        raise IngestError(str(exc)) from exc
    name = conditions.model_name(options.model)
    split = options.split or "all"
    if not conditions.image_runs(open_lake(lake_root), name, options.dataset, split, fingerprint):
        raise IngestError(conditions.missing_image_run(name, options.dataset, split))
    return condition


def _find_base_run(lake: Any, config: dict[str, Any], run_row: dict[str, Any]) -> str:
    """The image run with the same everything else: the id its config (no condition entry) hashes to."""
    base_id = make_run_id({k: v for k, v in config.items() if k != "condition"})
    if not lake.has_table("runs") or not lake.arrow("runs", filter={"run_id": base_id}).num_rows:
        raise IngestError(
            f"the image run with these settings ({base_id}) is not in the lake: an image run of "
            f"{run_row['model']} on these questions exists, but with other settings (layers, dtype, "
            "self-consistency, decoding or processor); run the image condition with exactly the options "
            "of this run first"
        )
    return base_id


def run_ingest(
    options: IngestOptions,
    lake_root: str,
    *,
    echo: Callable[[str], None] = print,
    confirm_bytes: bool = False,
    progress: bool | None = None,
    adapter: Adapter | None = None,
) -> IngestSummary:
    """Ingest one dataset with one model into the lake; resumable, idempotent.

    `adapter` reuses a loaded model (a scale-out worker loads it once for all its shards).
    """
    started = time.monotonic()
    plan = plan_ingest(options, lake_root, adapter=adapter)
    echo(plan.describe())
    if not confirm_bytes:
        check_size(plan.estimated_bytes, options.max_bytes)
    summary = execute_ingest(plan, lake_root, echo=echo, progress=progress)
    summary.seconds = time.monotonic() - started
    return summary


def execute_ingest(
    plan: IngestPlan,
    lake_root: str,
    *,
    echo: Callable[[str], None] = print,
    progress: bool | None = None,
) -> IngestSummary:
    """Write a planned run (shard): clean up an interrupted attempt, then capture what is missing."""
    from vrp.lake import open_lake

    options, adapter, layers, samples = plan.options, plan.adapter, plan.layers, plan.samples
    summary = IngestSummary(
        run_id=plan.run_id,
        model=adapter.name,
        total=len(samples),
        skipped_done=len(samples) - plan.pending,
        estimated_bytes=plan.estimated_bytes,
        task=plan.task,
    )
    # Nothing is written before this point: the writer first cleans up this shard's incomplete
    # samples, then reports what is committed (the authority; the plan's read only sized the run).
    lake = open_lake(lake_root)
    writer = lake.writer(plan.run_row, shard=options.shard, owned_sample_ids=[s.sample_id for s in samples])
    # a condition run's image-run last-layer residuals (for the first-token KL), read once at start
    base_last: dict[str, np.ndarray] = {}

    def record_load_errors(todo: list[Sample]) -> None:
        base_last.update(_base_residuals(lake, plan.condition, adapter, todo))
        failures = [
            {
                "sample_id": e.sample_id or f"{e.dataset}:{e.split}:{e.question_id}",
                "dataset": e.dataset,
                "split": e.split,
                "question_id": e.question_id,
                "stage": e.stage,
                "error": e.error,
            }
            for e in plan.load_errors
        ]
        if failures:
            writer.fail(failures)
            summary.failures.extend((f["sample_id"], f["stage"], f["error"]) for f in failures)

    def step(batch: Sequence[Sample]) -> BatchOutcome:
        rows, failures = _process_batch(
            adapter, plan.task, batch, layers, options, condition=plan.condition, base_last=base_last
        )
        return BatchOutcome(rows=rows, completed=len(rows.get("samples", [])), failures=failures)

    def tally(outcome: BatchOutcome) -> None:
        if outcome.failures:
            if options.strict:
                first = outcome.failures[0]
                raise IngestError(
                    f"sample {first['sample_id']} failed at {first['stage']}: {first['error']} "
                    "(--strict stops the run; without it the sample is recorded in failures)"
                )
            summary.failures.extend((f["sample_id"], f["stage"], f["error"]) for f in outcome.failures)
        _tally(summary, outcome.rows.get("samples", []))

    run_loop(
        writer,
        samples,
        step,
        batch_size=options.batch_size,
        commit_samples=options.commit_samples,
        desc=f"ingest {adapter.name}",
        progress=progress,
        echo=echo,
        start=record_load_errors,
        on_batch=tally,
        force=options.force,
    )
    return summary


def _base_residuals(
    lake: Lake, condition: Condition | None, adapter: Adapter, todo: Sequence[Sample]
) -> dict[str, np.ndarray]:
    """A condition run's image-run last-layer residuals (for the first-token KL); empty otherwise."""
    from vrp.ingest.conditions import base_residuals

    if condition is None or condition.base_run_id is None or not todo:
        return {}
    return base_residuals(lake, condition.base_run_id, adapter.num_layers - 1, [s.sample_id for s in todo])


def _committed_sample_ids(lake: Lake, run_id: str) -> set[str]:
    """Sample ids of this run already committed, read without writing anything."""
    ids = lake.arrow("samples", filter={"run_id": run_id}, columns=["sample_id"]).column("sample_id")
    return set(ids.to_pylist())


SUMMARY_COLUMNS = ("answer", "parse_status", "correct", "score", "answer_type")


def _tally(summary: IngestSummary, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        summary.written += 1
        summary.answers.append({c: row.get(c) for c in SUMMARY_COLUMNS})


def _image_tokens_per_sample(adapter: Adapter, samples: Sequence[Sample]) -> int:
    """Image tokens of the first readable sample, for the size estimate (0 when none is readable)."""
    from vrp.ingest.datasets import load_image

    for sample in samples[:3]:
        try:
            enc = adapter.encode([load_image(sample)], [sample.question])
        except Exception:  # noqa: BLE001 - an unreadable sample is reported when it is processed
            continue
        return int(len(enc.image_pos[0]))
    return 0


def _failure(sample: Sample, stage: str, error: str) -> dict[str, Any]:
    """A failures row of one sample, with the question it came from."""
    return {
        "sample_id": sample.sample_id,
        "dataset": sample.dataset,
        "split": sample.split,
        "question_id": sample.question_id,
        "stage": stage,
        "error": error,
    }


def _process_batch(
    adapter: Adapter,
    task: Task,
    batch: Sequence[Sample],
    layers: Sequence[int],
    options: IngestOptions,
    *,
    condition: Condition | None = None,
    base_last: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Load, encode, capture and (optionally) sample one batch -> lake rows and failure rows.

    A condition run replaces each image by its condition's (or drops it for ``none``) and adds
    each sample's first-token KL against its image run.
    """
    failures: list[dict[str, Any]] = []
    images, ready = [], []
    load_image = _batch_loader()
    for sample in batch:
        try:
            if condition is None:
                images.append(load_image(sample))
            elif not condition.text_only:
                images.append(condition.image(sample, load_image))
            ready.append(sample)
        except Exception as exc:  # noqa: BLE001 - any unreadable image is this sample's failure, not the run's
            failures.append(_failure(sample, "preprocess", str(exc)))
    if not ready:
        return {}, failures
    template = question_template(options.dataset, options.prompt_template)
    questions = [apply_template(template, s.question) for s in ready]
    enc = (
        adapter.encode_text(questions)
        if condition and condition.text_only
        else adapter.encode(images, questions)
    )
    # the picture the model saw (none in a text-only condition)
    pictures = [None] * len(ready) if condition and condition.text_only else _picture_rows(adapter, images)
    k = options.self_consistency
    seeds = [[sample_seed(options.seed, s.sample_id, i) for i in range(k)] for s in ready]
    cap = capture_batch(
        adapter,
        enc,
        ready,
        task=task,
        images=images,
        questions=questions,
        max_new_tokens=options.max_new_tokens,
        seeds=seeds,
        temperature=options.temperature,
        top_p=options.top_p,
        evidence_layers=layers if options.evidence else None,
    )
    kls: list[float | None] = [None] * len(ready)
    if condition is not None:
        from vrp.ingest.conditions import first_token_kls

        kls = first_token_kls(adapter, [(base_last or {}).get(s.sample_id) for s in ready], cap.first_logits)
    rows: dict[str, list[dict[str, Any]]] = {}
    for b, sample in enumerate(ready):
        if cap.nonfinite[b] is not None:
            failures.append(_failure(sample, "capture", f"non-finite value in {cap.nonfinite[b]}"))
            continue
        sampled = _sample_rows(task, sample, cap, b, layers, cap.sampled[b], seeds[b], options)
        if condition is not None:
            sampled["samples"][0]["first_token_kl"] = kls[b]
        if pictures[b] is not None:
            sampled["samples"][0]["image_hash"] = pictures[b]["image_hash"]
            sampled["images"] = [pictures[b]]
        for table, table_rows in sampled.items():
            rows.setdefault(table, []).extend(table_rows)
    return rows, failures


def _batch_loader() -> Callable[[Sample], Image.Image]:
    """``load_image`` for one batch that reads and decodes each picture file once.

    POPE asks six questions about each picture, one after the other, so a batch holds each picture
    several times. The questions of one picture get the same decoded object (nothing downstream
    changes a picture in place), which also lets :func:`_picture_rows` know them apart for free.
    Failures are not remembered: each question about an unreadable picture fails on its own.
    """
    from vrp.ingest.datasets import load_image

    loaded: dict[object, Image.Image] = {}

    def load(sample: Sample) -> Image.Image:
        key = sample.image_path if sample.image_path is not None else sample.image_bytes
        if key is None:
            return load_image(sample)  # raises the sample's own error
        if key not in loaded:
            loaded[key] = load_image(sample)
        return loaded[key]

    return load


def _picture_rows(adapter: Adapter, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
    """One ``images`` row per image: each picture object's model view made once, each view PNG-encoded once.

    The model's view (the processor's resize and crop) and its PNG are most of what storing a
    picture costs; :func:`_batch_loader` hands every question about one picture the same object.
    Two objects with the same pixels (a condition's grey image) share one encoding by their hash.
    """
    first: dict[int, int] = {}  # id(picture object) -> index among the distinct objects
    distinct: list[Image.Image] = []
    for image in images:
        if id(image) not in first:
            first[id(image)] = len(distinct)
            distinct.append(image)
    encoded: dict[str, dict[str, Any]] = {}
    rows = []
    for view in adapter.model_views(distinct):
        digest = image_hash(view)
        if digest not in encoded:
            encoded[digest] = image_row(view)
        rows.append(encoded[digest])
    return [rows[first[id(image)]] for image in images]


def _sample_rows(
    task: Task,
    sample: Sample,
    cap: BatchCapture,
    b: int,
    layers: Sequence[int],
    texts: Sequence[str],
    seeds: Sequence[int],
    options: IngestOptions,
) -> dict[str, list[dict[str, Any]]]:
    """One sample's rows for every table (run_id and model are filled in by the writer)."""
    key = {"sample_id": sample.sample_id}
    generations = []
    answers = []
    for k, (text, seed) in enumerate(zip(texts, seeds, strict=True)):
        answer, status = task.parse(text)
        correct, score = task.score(answer, sample)
        answers.append(answer)
        generations.append(
            {
                **key,
                "k": k,
                "text": text,
                "answer": answer,
                "parse_status": status,
                "correct": correct,
                "score": score,
                "seed": seed,
                "temperature": options.temperature,
                "top_p": options.top_p,
            }
        )
    sc_answer, sc_agreement = majority_answer(answers) if answers else (None, None)
    captured = cap.samples[b]
    sample_row = {
        **key,
        "dataset": sample.dataset,
        "split": sample.split,
        "question_id": sample.question_id,
        "image_id": sample.image_id,
        "question": sample.question,
        "object": sample.object,
        "label": sample.label,
        "category": sample.category,
        "task": sample.task,
        "answers": None if sample.answers is None else list(sample.answers),
        "question_type": sample.question_type,
        "answer_type": sample.answer_type,
        "source": sample.source,
        **captured,
        # None when the answer did not parse: unscored, never silently counted as wrong
        "correct": captured["correct"],
        "sc_agreement": sc_agreement,
        "sc_answer": sc_answer,
        "sc_k": options.self_consistency,
    }
    return {
        "samples": [sample_row],
        "layers": [{**key, **row} for row in cap.layers[b]],
        "heads": [{**key, **row} for row in cap.heads[b]],
        "attention_maps": [{**key, **row} for row in attention_map_rows(cap, b, layers)],
        "evidence_maps": [{**key, **row} for row in evidence_map_rows(cap, b, layers)],
        "hidden": [
            {**key, "site": site, "layer": layer, "h": np.ascontiguousarray(cap.hidden[b][site][layer])}
            for site in HIDDEN_SITES
            for layer in layers
        ],
        "generations": generations,
    }


def attention_map_rows(cap: BatchCapture, b: int, layers: Sequence[int]) -> list[dict[str, Any]]:
    """Sample ``b``'s ``attention_maps`` rows (docs/ARCHITECTURE.md section 4.1b).

    Per stored layer: the map over the whole image (``tile`` -1; its mass, H_s and C_k are the
    ``layers`` row's) and, for an image seen as several grids, each grid's map (``tile`` 0..,
    global view first) with its own raw mass, H_s and C_k. A text-only row (the `none`
    condition) has no image tokens and no maps.
    """
    layout = cap.layouts[b] if cap.layouts else None
    if not cap.maps[b] or layout is None:
        return []
    rows = []
    for layer in layers:
        summary = cap.layers[b][layer]
        grids = cap.grid_maps[b][layer] if layout.multi else []
        grid_h, grid_w = layout.stitched
        rows.append(
            {
                "layer": layer,
                "tile": -1,
                "grid_h": grid_h,
                "grid_w": grid_w,
                "map": cap.maps[b][layer],
                # several grids: the cells' mass, without the row separators' share of image_mass
                "mass": sum(g.mass for g in grids) if grids else summary["image_mass"],
                **{k: summary[k] for k in ("spatial_entropy", "spatial_entropy_norm", "cluster_count")},
            }
        )
        rows.extend(
            {
                "layer": layer,
                "tile": grid.tile,
                "grid_h": grid.rows,
                "grid_w": grid.cols,
                "map": values.map,
                "mass": values.mass,
                "spatial_entropy": values.entropy,
                "spatial_entropy_norm": values.entropy_norm,
                "cluster_count": values.clusters,
            }
            for grid, values in zip(layout.grids if grids else (), grids, strict=True)
        )
    return rows


def evidence_map_rows(cap: BatchCapture, b: int, layers: Sequence[int]) -> list[dict[str, Any]]:
    """Sample ``b``'s ``evidence_maps`` rows: per stored layer the whole-image map (``tile`` -1) and,
    for several grids, each grid's (``tile`` 0..). None without evidence or without an image."""
    layout = cap.layouts[b] if cap.layouts else None
    if not cap.evidence or layout is None:
        return []
    rows = []
    for layer in layers:
        if layer not in cap.evidence[b]:
            continue
        grid_h, grid_w = layout.stitched
        rows.append(
            {"layer": layer, "tile": -1, "grid_h": grid_h, "grid_w": grid_w, "map": cap.evidence[b][layer]}
        )
        if layout.multi:
            rows += [
                {"layer": layer, "tile": grid.tile, "grid_h": grid.rows, "grid_w": grid.cols, "map": values}
                for grid, values in zip(layout.grids, cap.grid_evidence[b][layer], strict=True)
            ]
    return rows
