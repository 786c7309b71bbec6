"""The yes/no task (POPE, shapes-POPE): the first yes/no word, scored against a yes/no label.

First-token statistics sum the probability of every single-token spelling of "yes" and of
"no" (``answer_token_ids``), so ``p_yes`` is comparable across tokenizers; the truth token is
the spelling of the label the model itself scores highest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from vrp.ingest.answers import parse_answer
from vrp.tasks.base import Gold, Task, TaskError


def yes_no_ids(adapter: Any) -> tuple[list[int], list[int]]:
    """The tokenizer's single-token spellings of yes and no, or :class:`TaskError` if it has none."""
    from vrp.ingest.models.base import answer_token_ids

    cached = getattr(adapter, "_yes_no_ids", None)
    if cached is None:
        cached = (answer_token_ids(adapter.tokenizer, "yes"), answer_token_ids(adapter.tokenizer, "no"))
        adapter._yes_no_ids = cached
    yes, no = cached
    if not yes or not no:
        raise TaskError(
            f"the tokenizer of {adapter.source} has no single-token 'yes'/'no', so yes/no margins are "
            "undefined; ingest open-ended questions instead (a VQA-style dataset)"
        )
    return yes, no


def yes_no_stats(
    logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]
) -> dict[str, np.ndarray]:
    """p_yes, p_no (summed over spellings) and the yes-minus-no log-sum-exp margin, from logits [B, V]."""
    logits = logits.float()
    probs = torch.log_softmax(logits, dim=-1).exp()  # as the task-free statistics compute them
    yes_lse = torch.logsumexp(logits[:, list(yes_ids)], dim=-1)
    no_lse = torch.logsumexp(logits[:, list(no_ids)], dim=-1)
    return {
        "p_yes": probs[:, list(yes_ids)].sum(-1).numpy(),
        "p_no": probs[:, list(no_ids)].sum(-1).numpy(),
        "yes_no_margin": (yes_lse - no_lse).numpy(),
    }


class YesNoTask(Task):
    """See the module docstring."""

    name: ClassVar[str] = "yesno"
    metrics_query: ClassVar[str] = "pope_metrics"
    token_columns: ClassVar[tuple[str, ...]] = ("p_yes", "p_no", "yes_no_margin")
    lens_columns: ClassVar[tuple[str, ...]] = ("lens_yes_no_margin",)
    margin_column: ClassVar[str] = "yes_no_margin"
    margin_label: ClassVar[str] = "yes/no margin"

    def check(self, adapter: Any) -> None:
        yes_no_ids(adapter)

    def identity(self, adapter: Any) -> dict[str, Any]:
        yes, no = yes_no_ids(adapter)
        return {"task": self.name, "yes_ids": yes, "no_ids": no}

    def truth_ids(
        self,
        adapter: Any,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        golds: Sequence[Gold],
        first_logits: torch.Tensor,
    ) -> torch.Tensor:
        yes, no = yes_no_ids(adapter)
        ids = []
        for b, gold in enumerate(golds):
            variants = yes if gold.label == "yes" else no
            ids.append(variants[int(first_logits[b, list(variants)].argmax())])
        return torch.tensor(ids, dtype=torch.long)

    def token_stats(self, adapter: Any, logits: torch.Tensor) -> dict[str, np.ndarray]:
        return yes_no_stats(logits, *yes_no_ids(adapter))

    def lens_stats(self, adapter: Any, logits: torch.Tensor) -> dict[str, np.ndarray]:
        return {"lens_yes_no_margin": yes_no_stats(logits, *yes_no_ids(adapter))["yes_no_margin"]}

    def parse(self, text: str) -> tuple[str | None, str]:
        return parse_answer(text)

    def score(self, answer: str | None, gold: Gold) -> tuple[bool | None, float | None]:
        if answer is None or gold.label is None:
            return None, None
        correct = answer == gold.label
        return correct, float(correct)

    def summary_lines(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        scored = [r for r in rows if r["correct"] is not None]
        unknown = sum(1 for r in rows if r["parse_status"] != "ok")
        if scored:
            correct = sum(1 for r in scored if r["correct"])
            yes = sum(1 for r in scored if r["answer"] == "yes")
            return [
                f"accuracy {correct / len(scored):.3f} and yes-ratio {yes / len(scored):.3f} "
                f"over {len(scored)} parsed answers; unknown answers {unknown} (stored unscored)"
            ]
        if rows:
            return [f"no answer parsed as yes/no: {unknown} unknown answers (stored unscored)"]
        return []
