"""The one run loop: begin, plan the missing samples, batches, commits, finish (docs/ARCHITECTURE.md 6.3).

Usage::

    writer = lake.writer(run_row, owned_sample_ids=[s.sample_id for s in samples])
    todo = run_loop(writer, samples, step, batch_size=8, commit_samples=256, desc="ingest toy-llava")

``step(batch)`` turns one batch of samples into a :class:`BatchOutcome` (rows per table and
failures); the loop owns everything else: ``writer.begin()`` (which cleans up an interrupted
attempt and says which samples are complete), the progress bar, halving the batch on a GPU
out-of-memory error, committing in groups of at least ``commit_samples`` completed samples (so
files are not tiny), recording failures, and ``writer.finish()``. A capture run (`vrp ingest run`)
and every intervention kind run through it, so resume and idempotence are defined once: a sample
is complete when its row in the run's completion table is committed (see ``vrp/lake/writer.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from vrp.lake.writer import RunWriter


class HasSampleId(Protocol):
    sample_id: str


S = TypeVar("S", bound=HasSampleId)


@dataclass
class BatchOutcome:
    """What one batch produced: rows per table, how many samples it completed, failures."""

    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    completed: int = 0  # samples whose completion-table rows are in `rows`
    failures: list[dict[str, Any]] = field(default_factory=list)  # sample_id, stage, error


def run_loop(
    writer: RunWriter,
    samples: Sequence[S],
    step: Callable[[Sequence[S]], BatchOutcome],
    *,
    batch_size: int,
    commit_samples: int,
    desc: str,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
    start: Callable[[list[S]], None] | None = None,
    on_batch: Callable[[BatchOutcome], None] | None = None,
    force: bool = False,
) -> list[S]:
    """Run ``step`` over the samples not yet complete and commit; returns the samples it processed.

    ``start(todo)`` runs once after ``writer.begin()`` (e.g. to record load failures or announce
    the work); ``on_batch(outcome)`` sees every batch's outcome before it is committed (tallies).
    ``force`` lets ``begin()`` take over a run another live writer seems to hold (`--force`).
    """
    done = writer.begin(force=force)
    todo = [s for s in samples if s.sample_id not in done]
    if start is not None:
        start(todo)
    show = sys.stderr.isatty() if progress is None else progress
    pending: dict[str, list[dict[str, Any]]] = {}
    pending_samples = 0
    with tqdm(total=len(todo), desc=desc, unit="q", disable=not show) as bar:
        position = 0
        while position < len(todo):
            batch = todo[position : position + batch_size]
            try:
                outcome = step(batch)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                torch.cuda.empty_cache()
                echo(f"out of GPU memory: retrying with batch size {batch_size}")
                continue
            position += len(batch)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(outcome)
            if outcome.failures:
                writer.fail(outcome.failures)
            for table, rows in outcome.rows.items():
                pending.setdefault(table, []).extend(rows)
            pending_samples += outcome.completed
            if pending_samples >= commit_samples:
                writer.commit(pending)
                pending, pending_samples = {}, 0
    if pending_samples:
        writer.commit(pending)
    writer.finish("complete")
    return todo
