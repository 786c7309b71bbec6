"""The task seam: everything that depends on the kind of answer, behind one small interface.

A *task* says what a sample's truth token is, which first-token statistics beyond the task-free
ones it records, how generated text becomes an answer, how an answer is scored, what a run's
summary line says and which named query holds its headline metrics. Capture, self-consistency,
interventions, analyses and the report ask the task; nothing else branches on it.

Usage::

    task = get_task("open", correct_rule="lenient")
    task.check(adapter)                       # refuses a tokenizer the task cannot work with
    ids = task.truth_ids(adapter, images, questions, golds, first_logits)
    answer, status = task.parse(text)
    correct, score = task.score(answer, gold)

Adding a task is one module here with a :class:`Task` subclass and one line in ``TASKS``
(``vrp/tasks/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:  # type-only: tasks import no model code at run time
    from vrp.ingest.models.base import Adapter


class Gold(Protocol):
    """What a task needs to know about a sample's right answer (a ``Sample`` provides it)."""

    @property
    def label(self) -> str | None: ...

    @property
    def answers(self) -> tuple[str, ...] | None: ...


@dataclass(frozen=True)
class Label:
    """A :class:`Gold` made of a stored label (and human answers, when there are any)."""

    label: str | None
    answers: tuple[str, ...] | None = None


def as_gold(value: Gold | str) -> Gold:
    """A gold answer from a sample, or from a bare label such as ``"yes"``."""
    return Label(value) if isinstance(value, str) else value


class TaskError(ValueError):
    """A model or sample a task cannot work with; the message says what to do."""


class Task:
    """Base class of a task; see the module docstring. Subclasses set the class attributes."""

    name: ClassVar[str]
    #: named query (vrp/queries/<name>.sql) with the task's headline metrics
    metrics_query: ClassVar[str]
    #: sample-level columns the task fills beyond the task-free first-token statistics
    token_columns: ClassVar[tuple[str, ...]] = ()
    #: layers-level logit-lens columns the task fills
    lens_columns: ClassVar[tuple[str, ...]] = ()
    #: the first-token margin a run summary averages, and how it is called there
    margin_column: ClassVar[str] = "truth_margin"
    margin_label: ClassVar[str] = "truth margin"

    def check(self, adapter: Adapter) -> None:
        """Raise :class:`TaskError` when the adapter's tokenizer cannot serve this task."""

    def identity(self, adapter: Adapter) -> dict[str, Any]:
        """What of the task changes the numbers: hashed into the run id."""
        return {"task": self.name}

    def truth_ids(
        self,
        adapter: Adapter,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        golds: Sequence[Gold],
        first_logits: torch.Tensor,
    ) -> torch.Tensor:
        """Per sample, the token id that stands for the right answer's first token. [B] long

        -1 where a sample has no right answer (its truth columns are then stored null).
        """
        raise NotImplementedError

    def truth_candidates(
        self,
        adapter: Adapter,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        golds: Sequence[Gold],
    ) -> list[int]:
        """Every token :meth:`truth_ids` may return for these samples, known before the forward pass.

        The evidence maps project each layer's image positions onto these while the prefill runs
        (docs/ARCHITECTURE.md 4.5b); the truth token itself may depend on the final logits. This
        default serves tasks whose truth token does not: it asks :meth:`truth_ids` without logits.
        """
        ids = self.truth_ids(adapter, images, questions, golds, None)  # type: ignore[arg-type]
        return sorted({int(i) for i in ids.tolist() if i >= 0})

    def token_stats(self, adapter: Adapter, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """Task-specific statistics of next-token logits [B, V] (float32), keyed by sample column."""
        return {}

    def lens_stats(self, adapter: Adapter, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """Task-specific statistics of one layer's logit-lens logits [B, V], keyed by layers column."""
        return {}

    def parse(self, text: str) -> tuple[str | None, str]:
        """(answer, parse_status) of generated text; None answers stay unscored."""
        raise NotImplementedError

    def score(self, answer: str | None, gold: Gold) -> tuple[bool | None, float | None]:
        """(correct, score) of a parsed answer; (None, None) when it cannot be scored."""
        raise NotImplementedError

    def summary_lines(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        """The lines a run prints about its answers (rows are its ``samples`` rows)."""
        raise NotImplementedError
