"""The intervention protocol and what every kind shares (docs/ARCHITECTURE.md section 5).

What this module offers:

* :class:`Intervention` - the protocol a kind implements, as a small base class:

  - *plan*: a ``plan_<kind>(lake, base_run_id, ...)`` function that reads what the kind needs from
    the lake and checks every prerequisite **before a model is loaded**, returning the kind's
    instance (its ``setting``, ``params`` hashed into the run id, and whatever it read);
  - :meth:`Intervention.conditions` - what each sample is answered under (``full`` first when the
    kind has a reference);
  - :meth:`Intervention.prepare` - per batch, anything computed once for all conditions (a
    donor's activations, the chosen patches);
  - :meth:`Intervention.apply` - a context manager around the model for one batch and one
    condition, yielding the inputs to answer from; per-row edits are allowed;
  - :meth:`Intervention.rows` - the ``interventions`` rows the kind stores for that condition.

* :func:`run_intervention` - executes any kind as a run of its own through the one run loop
  (``vrp/runs/loop.py``); its ``run_id`` hashes the base run, the kind, the setting and the params.
* Lake reads shared by the kinds (:func:`base_run`, :func:`num_layers_of`, :func:`peak_layer`,
  :func:`probe_order`, ...), all through the lake's Arrow filters, never SQL built from values.

Usage::

    plan = plan_mask(lake, base_run_id, ratio=0.3, layer=-1, seed=1)
    summary = run_intervention(plan, lake_root)

An intervention run's ``runs`` row has ``kind`` and ``base_run_id`` set; its answers live in
``interventions`` only, and a sample is complete once its ``interventions`` rows (all conditions of
one sample, committed together) are in the lake.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image

import vrp
from vrp.ingest.datasets import Sample
from vrp.ingest.models.base import Adapter, Encoded, resolve_layer
from vrp.ingest.prompts import apply_template
from vrp.interventions.scoring import answer_batch
from vrp.lake import Lake
from vrp.lake.identity import make_run_id
from vrp.runs.loop import BatchOutcome, run_loop
from vrp.schema import CONDITION_KINDS
from vrp.tasks import Task, task_of_run
from vrp.tasks.base import Label

NEURON_SITE = "mlp_out"


class InterventionError(RuntimeError):
    """An intervention that cannot run; the message says what is missing and what to do."""


@dataclass(frozen=True)
class Condition:
    """One way a batch is answered: its name and level (the key's last two columns), plus what it does."""

    name: str
    level: float
    payload: Any = None


@dataclass
class Intervention:
    """A checked intervention of one kind on one base run (see the module docstring)."""

    kind: ClassVar[str]
    base: dict[str, Any]  # the base run's `runs` row, config parsed
    setting: str
    seed: int
    params: dict[str, Any]  # hashed with the base run, kind and setting

    # ----- identity ---------------------------------------------------------------------------------
    @property
    def base_run_id(self) -> str:
        return str(self.base["run_id"])

    @property
    def max_new_tokens(self) -> int:
        return int(self.base["config"].get("decoding", {}).get("max_new_tokens", 8))

    @property
    def config(self) -> dict[str, Any]:
        from vrp.schema import SCHEMA_VERSION

        return {
            "base_run_id": self.base_run_id,
            "kind": self.kind,
            "setting": self.setting,
            **self.params,
            "max_new_tokens": self.max_new_tokens,
            "schema_version": SCHEMA_VERSION,
        }

    @property
    def run_id(self) -> str:
        return make_run_id(self.config)

    @property
    def task(self) -> Task:
        """The task the base run was ingested with (it parses and scores the edited answers)."""
        return task_of_run(self.base["config"])

    def encode(
        self, adapter: Adapter, samples: Sequence[Sample]
    ) -> tuple[Encoded, list[Image.Image], list[str]]:
        """Samples encoded as the base run encoded them (its question template): (enc, images, questions)."""
        from vrp.ingest.datasets import load_image

        template = self.base["config"].get("question_template", "{question}")
        images = [load_image(s) for s in samples]
        questions = [apply_template(template, s.question) for s in samples]
        return adapter.encode(images, questions), images, questions

    # ----- the protocol -----------------------------------------------------------------------------
    def select(self, samples: Sequence[Sample]) -> list[Sample]:
        """The base samples this run answers (all of them unless the kind says otherwise)."""
        return list(samples)

    def notes(self) -> list[str]:
        """Lines for the summary about what the plan left out and why (e.g. skipped pairs)."""
        return []

    def conditions(self) -> Sequence[Condition]:
        raise NotImplementedError

    def prepare(self, adapter: Adapter, enc: Encoded, batch: Sequence[Sample]) -> Any:
        """Per-batch state shared by all conditions (default: none)."""
        return None

    @contextlib.contextmanager
    def apply(
        self, adapter: Adapter, enc: Encoded, condition: Condition, state: Any
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Edit the model (or the inputs) for one condition; yields the inputs to answer from."""
        yield enc.inputs

    def rows(
        self,
        condition: Condition,
        batch: Sequence[Sample],
        answers: Sequence[dict[str, Any]],
        state: Any,
        reference: Sequence[dict[str, Any]] | None,
    ) -> list[dict[str, Any]]:
        """The ``interventions`` rows of one condition; ``reference``: the batch's ``full`` answers."""
        raise NotImplementedError


# ----- lake reads: everything checked before a model is loaded ------------------------------------------


def base_run(lake: Lake, run_id: str) -> dict[str, Any]:
    """The base run's `runs` row with its config parsed; clear errors for a missing or wrong run."""
    rows = lake.arrow("runs", filter={"run_id": run_id}).to_pylist() if lake.has_table("runs") else []
    if not rows:
        raise InterventionError(
            f"no run {run_id!r} in the lake at {lake.root}; ingest one with `vrp ingest run` "
            "or list runs with "
            '`vrp query "select run_id, model, dataset, status from runs"`'
        )
    row = dict(rows[0])
    if row.get("kind"):
        what = "an image-condition run" if row["kind"] in CONDITION_KINDS else "an intervention"
        raise InterventionError(
            f"run {run_id} is {what} ({row['kind']}); pass the image run it was made from "
            f"({row.get('base_run_id')})"
        )
    row["config"] = json.loads(row.get("config") or "{}")
    if not lake.arrow("samples", filter={"run_id": run_id}, columns=["sample_id"]).num_rows:
        raise InterventionError(
            f"run {run_id} has no completed samples; finish it with `vrp ingest run` first"
        )
    return row


def base_samples(lake: Lake, run_id: str, columns: Sequence[str]) -> list[dict[str, Any]]:
    """The base run's `samples` rows (the given columns), sorted by sample id."""
    table = lake.arrow("samples", filter={"run_id": run_id}, columns=["sample_id", *columns])
    return sorted(table.to_pylist(), key=lambda r: r["sample_id"])


def num_layers_of(lake: Lake, run_id: str) -> int:
    """Decoder layers of the base run's model: the `layers` table holds every layer of every sample."""
    layers = lake.arrow("layers", filter={"run_id": run_id}, columns=["layer"]).column("layer")
    if len(layers) == 0:
        raise InterventionError(f"run {run_id} has no `layers` rows; it is not a complete `vrp ingest run`")
    return int(max(layers.to_pylist())) + 1


def parse_layer_spec(spec: str, num_layers: int) -> list[tuple[int, ...]]:
    """Windows of layers from ``"0-3,4-7"``, ``"5"``, ``"-1"`` or ``"all"`` (one window per layer).

    A window ``a-b`` is inclusive; a negative layer counts from the end. ``all`` gives every layer
    as its own window.
    """
    text = spec.strip()
    if text == "all":
        return [(layer,) for layer in range(num_layers)]
    windows = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        head, sep, tail = part.partition("-") if not part.startswith("-") else ("", "", "")
        try:
            if sep and head:
                start, end = int(head), int(tail)
            else:
                start = end = int(part)
        except ValueError as exc:
            raise InterventionError(
                f"bad layer spec {part!r}: expected layers like 3, -1 or 0-3, separated by commas, or all"
            ) from exc
        first, last = resolve_layer(start, num_layers), resolve_layer(end, num_layers)
        if last < first:
            raise InterventionError(f"layer window {part!r} ends before it starts")
        windows.append(tuple(range(first, last + 1)))
    if not windows:
        raise InterventionError(f"no layers in {spec!r}")
    return windows


def peak_layer(lake: Lake, run_id: str) -> int:
    """The layer whose single-layer logistic probe scored the highest held-out AUROC (`probe_layers`).

    The residual-stream probes are preferred (the study's probe), the MLP-output ones used when only
    those exist; ties go to the earlier layer.
    """
    table = lake.arrow(
        "probe_layers", filter={"run_id": run_id, "probe": "logreg"}, columns=["site", "layer", "auroc"]
    )
    rows = [(r["site"], r["layer"], r["auroc"]) for r in table.to_pylist() if r["auroc"] is not None]
    if not rows:
        raise InterventionError(
            f"run {run_id} has no probe results (probe_layers); run `vrp analyze probes` first, "
            "or pass a layer number"
        )
    for site in ("resid", NEURON_SITE):
        mine = [(layer, auroc) for s, layer, auroc in rows if s == site]
        if mine:
            return int(min(mine, key=lambda item: (-item[1], item[0]))[0])
    layer, _ = min(((layer, auroc) for _s, layer, auroc in rows), key=lambda item: (-item[1], item[0]))
    return int(layer)


def probe_order(lake: Lake, run_id: str, layer: int, method: str) -> list[int]:
    """Coordinates of layer ``layer``'s MLP output in the probe's rank order (`probe_neurons`)."""
    table = lake.arrow(
        "probe_neurons",
        filter={"run_id": run_id, "site": NEURON_SITE, "layer": int(layer), "method": method},
        columns=["neuron", "rank", "coef"],
    )
    rows = [(r["neuron"], r["rank"], r["coef"]) for r in table.to_pylist()]
    if not rows:
        raise InterventionError(
            f"run {run_id} has no {method} probe neurons for layer {layer} "
            f"(probe_neurons, site {NEURON_SITE}); "
            "run `vrp analyze probes` first"
        )
    rows.sort(key=lambda r: (r[1] if r[1] is not None else math.inf, -abs(r[2] or 0.0), r[0]))
    return [int(r[0]) for r in rows]


def hidden_size(base: dict[str, Any]) -> int:
    size = base["config"].get("hidden_size")
    if not size:
        raise InterventionError(f"run {base['run_id']} does not record hidden_size in its config")
    return int(size)


def n_cells(ratio: float, total: int) -> int:
    """How many of ``total`` cells (or coordinates) a ratio covers: rounded half up (0.3 of 576 -> 173)."""
    return int(math.floor(ratio * total + 0.5))


# ----- running -----------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Running sums of one (condition, level) over the samples answered now."""

    correct: int = 0
    n: int = 0
    margin: float = 0.0
    truth: float = 0.0
    restoration: float = 0.0
    n_restoration: int = 0

    def add(self, row: dict[str, Any], margin_column: str) -> None:
        self.correct += bool(row["correct"])
        self.n += 1
        self.margin += row.get(margin_column) or 0.0
        self.truth += row.get("truth_margin") or 0.0
        if row.get("restoration") is not None:
            self.restoration += row["restoration"]
            self.n_restoration += 1


@dataclass
class InterventionSummary:
    """What an intervention run did, for the terminal and for tests."""

    run_id: str
    base_run_id: str
    kind: str
    setting: str
    total: int
    skipped_done: int
    written: int = 0
    tally: dict[tuple[str, float], Tally] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    margin_label: str = "yes/no margin"  # the task's own margin (`Task.margin_label`)

    def lines(self) -> list[str]:
        out = [
            f"{self.kind} run {self.run_id} (base {self.base_run_id}, {self.setting}): "
            f"{self.written} new samples, "
            f"{self.skipped_done} already in the lake, {self.seconds:.1f}s"
        ]
        out += [f"  {note}" for note in self.notes]
        for (condition, level), t in sorted(self.tally.items()):
            line = f"  {condition:<7} level {level:g}: accuracy {t.correct / t.n:.3f}, "
            line += f"mean {self.margin_label} {t.margin / t.n:+.3f}"
            if self.margin_label != "truth margin":
                line += f", mean truth margin {t.truth / t.n:+.3f}"
            if t.n_restoration:
                line += f", mean restoration {t.restoration / t.n_restoration:+.3f}"
            out.append(line + f" (n={t.n})")
        return out


def find_base_samples(
    plan: Intervention,
    lake: Lake,
    *,
    data_dir: str | None = None,
    pope_file: str | None = None,
    image_dir: str | None = None,
) -> tuple[list[Sample], dict[str, str]]:
    """The base run's completed samples re-found in its dataset, and their labels.

    Paths come from the base run's config unless overridden. The sample id hashes the image bytes,
    so a sample found here is the very question and image the base run answered; one that cannot be
    found is an error (the files moved or changed).
    """
    from vrp.ingest.datasets import load_dataset

    base = plan.base
    source = base["config"].get("data_source", {})
    dataset = base["config"].get("dataset") or base.get("dataset")
    split = base["config"].get("split")
    kwargs = {
        "data_dir": data_dir or source.get("data_dir"),
        "pope_file": pope_file or source.get("pope_file"),
        "image_dir": image_dir or source.get("image_dir"),
        "questions_file": source.get("questions_file"),
        "annotations_file": source.get("annotations_file"),
        "data_file": source.get("data_file"),
    }
    if dataset in ("shapes-pope", "shapes-vqa"):
        kwargs = {"data_dir": kwargs["data_dir"]}
    else:
        kwargs.pop("data_dir")
    rows = base_samples(lake, plan.base_run_id, ["label", "question_id"])
    try:  # only the base run's questions: a VQAv2 file holds far more than a run answers
        samples, _errors = load_dataset(
            dataset,
            split=None if split in (None, "all") or dataset not in ("pope", "shapes-pope") else split,
            question_ids={r["question_id"] for r in rows},
            **kwargs,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise InterventionError(f"cannot re-read the base run's dataset {dataset!r}: {exc}") from exc
    labels = {r["sample_id"]: r["label"] for r in rows}
    found = [s for s in samples if s.sample_id in labels]
    missing = set(labels) - {s.sample_id for s in found}
    if missing:
        raise InterventionError(
            f"{len(missing)} of the base run's {len(labels)} samples are not in the dataset as read now "
            "(files moved or changed); pass the base run's data with --data-dir or --pope-file/--image-dir"
        )
    return found, labels


def run_row(plan: Intervention, device: str) -> dict[str, Any]:
    """The intervention run's `runs` row: the base run's model facts, this run's kind and config."""
    base = plan.base
    return {
        "run_id": plan.run_id,
        "model": base["model"],
        "model_source": base.get("model_source"),
        "model_revision": base.get("model_revision"),
        "family": base.get("family"),
        "dataset": base.get("dataset"),
        "split": base.get("split"),
        "dtype": base.get("dtype"),
        "device": device,
        "attention_backend": "sdpa",
        "code_version": vrp.__version__,
        "config": plan.config,
        "base_run_id": plan.base_run_id,
        "kind": plan.kind,
    }


def load_base_adapter(plan: Intervention, *, model: str | None = None, device: str = "cpu") -> Adapter:
    """The base run's model with its dtype and processor settings; refuses a checkpoint that changed."""
    from vrp.ingest.models import load_adapter
    from vrp.lake.identity import canonical_json

    base = plan.base
    settings = base["config"].get("adapter", {})
    adapter = load_adapter(
        model or base["model_source"],
        dtype=base.get("dtype") or "float32",
        device=device,
        min_pixels=settings.get("min_pixels"),
        max_pixels=settings.get("max_pixels"),
    )
    if adapter.revision != base.get("model_revision"):
        raise InterventionError(
            f"{adapter.source} is at revision {adapter.revision}, "
            f"the base run used {base.get('model_revision')}; "
            "intervene with the checkpoint the base run answered with"
        )
    if settings and canonical_json(adapter.settings) != canonical_json(settings):
        raise InterventionError(
            "the model's processor/prompt settings differ from the base run's; load it as the base run did"
        )
    return adapter


def answer_conditions(
    plan: Intervention, adapter: Adapter, batch: Sequence[Sample], labels: dict[str, str]
) -> list[dict[str, Any]]:
    """Every condition's ``interventions`` rows for one batch of samples."""
    enc, images, questions = plan.encode(adapter, batch)
    golds = [Label(labels[s.sample_id], s.answers) for s in batch]
    asked = {"task": plan.task, "images": images, "questions": questions}
    state = plan.prepare(adapter, enc, batch)
    rows: list[dict[str, Any]] = []
    reference = None
    for condition in plan.conditions():
        with plan.apply(adapter, enc, condition, state) as inputs:
            answers = answer_batch(adapter, inputs, golds, **asked, max_new_tokens=plan.max_new_tokens)
        if condition.name == "full":
            reference = answers
        rows.extend(plan.rows(condition, batch, answers, state, reference))
    return rows


def run_intervention(
    plan: Intervention,
    lake_root: str,
    *,
    model: str | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    commit_samples: int = 256,
    data_dir: str | None = None,
    pope_file: str | None = None,
    image_dir: str | None = None,
    adapter: Adapter | None = None,
    echo: Callable[[str], None] = print,
    progress: bool | None = None,
) -> InterventionSummary:
    """Execute a checked plan as a run of its own; resumable, and a rerun writes nothing.

    ``adapter`` (an already loaded base model) skips loading; otherwise the base run's checkpoint
    (or ``model``) is loaded with the base run's dtype and processor settings.
    """
    from vrp.lake import open_lake

    started = time.monotonic()
    lake = open_lake(lake_root)
    found, labels = find_base_samples(plan, lake, data_dir=data_dir, pope_file=pope_file, image_dir=image_dir)
    samples = plan.select(found)
    run_id = plan.run_id
    done = set(
        lake.arrow("interventions", filter={"run_id": run_id}, columns=["sample_id"])["sample_id"].to_pylist()
    )
    status = lake.arrow("runs", filter={"run_id": run_id}, columns=["status"]).to_pylist()
    summary = InterventionSummary(
        run_id=run_id,
        base_run_id=plan.base_run_id,
        kind=plan.kind,
        setting=plan.setting,
        total=len(samples),
        skipped_done=sum(s.sample_id in done for s in samples),
        margin_label=plan.task.margin_label,
    )
    margin_column = plan.task.margin_column
    if summary.skipped_done == len(samples) and status and status[0]["status"] == "complete":
        summary.notes = plan.notes()
        summary.seconds = time.monotonic() - started
        return summary  # nothing to do: not even the runs row is touched
    if adapter is None:
        adapter = load_base_adapter(plan, model=model, device=device)
    elif adapter.name != plan.base["model"]:
        raise InterventionError(f"adapter {adapter.name} is not the base run's model {plan.base['model']}")
    writer = lake.writer(run_row(plan, device), owned_sample_ids=[s.sample_id for s in samples])

    def step(batch: Sequence[Sample]) -> BatchOutcome:
        rows = answer_conditions(plan, adapter, batch, labels)
        return BatchOutcome(rows={"interventions": rows}, completed=len({r["sample_id"] for r in rows}))

    def tally(outcome: BatchOutcome) -> None:
        for row in outcome.rows["interventions"]:
            summary.tally.setdefault((row["condition"], row["level"]), Tally()).add(row, margin_column)
        summary.written += outcome.completed

    run_loop(
        writer,
        samples,
        step,
        batch_size=batch_size,
        commit_samples=commit_samples,
        desc=f"{plan.kind} {adapter.name}",
        progress=progress,
        echo=echo,
        start=lambda todo: echo(
            f"{plan.kind} run {run_id}: {len(todo)} of {len(samples)} samples to answer ({plan.setting})"
        ),
        on_batch=tally,
    )
    summary.notes = plan.notes()
    summary.seconds = time.monotonic() - started
    return summary
