"""The open-ended task (VQAv2, shapes-VQA): a short free-text answer, scored against human answers.

The answer is the greedy text up to the first newline (generation already stops at an end
token), normalised with the VQA answer processing (``vrp.tasks.vqa``). ``score`` is the official
VQA accuracy against the human answers, ``correct`` follows the run's rule (lenient, exact or
vqa). A sample without human answers (VQAv2 test-dev) stores its answer unscored.

The truth token is teacher-forced: the prompt and the gold answer (``multiple_choice_answer``)
are tokenised together the way the model's processor does (``Adapter.answer_ids``), and the
first token past the prompt is the one the model would emit first for that answer. With a
SentencePiece tokenizer that is the space-marked piece ("▁2" after LLaVA's "ASSISTANT:"); with
byte-level BPE after Qwen2-VL's "assistant\\n" it is the bare "2".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image

from vrp.tasks.base import Gold, Task, TaskError
from vrp.tasks.vqa import CORRECT_RULES, DEFAULT_CORRECT_RULE, is_correct, normalise_vqa_answer, vqa_accuracy

if TYPE_CHECKING:  # type-only: tasks import no model code at run time
    from vrp.ingest.models.base import Adapter


def first_line(text: str) -> str:
    """The answer part of generated text: everything before the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


class OpenTask(Task):
    """See the module docstring."""

    name: ClassVar[str] = "open"
    metrics_query: ClassVar[str] = "vqa_metrics"

    def __init__(self, correct_rule: str = DEFAULT_CORRECT_RULE) -> None:
        if correct_rule not in CORRECT_RULES:
            raise TaskError(
                f"unknown --correct rule {correct_rule!r}; expected one of {', '.join(CORRECT_RULES)}"
            )
        self.correct_rule = correct_rule

    def identity(self, adapter: Adapter) -> dict[str, Any]:
        return {"task": self.name, "correct_rule": self.correct_rule, "truth_token": "teacher-forced"}

    def truth_ids(
        self,
        adapter: Adapter,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        golds: Sequence[Gold],
        first_logits: torch.Tensor,
    ) -> torch.Tensor:
        ids = []
        for image, question, gold in zip(images, questions, golds, strict=True):
            reference = gold.label if gold.label else (gold.answers[0] if gold.answers else None)
            # no gold answer (VQAv2 test-dev): no truth token, the truth columns stay null
            ids.append(adapter.answer_ids(image, question, reference)[0] if reference else -1)
        return torch.tensor(ids, dtype=torch.long)

    def parse(self, text: str) -> tuple[str | None, str]:
        answer = normalise_vqa_answer(first_line(text))
        return (answer, "ok") if answer else (None, "unknown")

    def score(self, answer: str | None, gold: Gold) -> tuple[bool | None, float | None]:
        if answer is None or not gold.answers:
            return None, None
        score = vqa_accuracy(answer, gold.answers)
        reference = gold.label if gold.label else gold.answers[0]
        return is_correct(self.correct_rule, answer, reference, score), score

    def summary_lines(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        scored = [r for r in rows if r.get("score") is not None]
        unknown = sum(1 for r in rows if r["parse_status"] != "ok")
        unscored = len(rows) - unknown - len(scored)
        if not scored:
            return (
                [f"no answer scored: {unknown} empty answers, {unscored} without human answers"]
                if rows
                else []
            )
        accuracy = sum(1 for r in scored if r["correct"]) / len(scored)
        mean = float(np.mean([r["score"] for r in scored]))
        out = [
            f"accuracy ({self.correct_rule}) {accuracy:.3f} and mean VQA score {mean:.3f} over {len(scored)} "
            f"scored answers; empty answers {unknown}, unscored (no human answers) {unscored}"
        ]
        types = sorted({r.get("answer_type") for r in scored if r.get("answer_type")})
        for kind in types:
            part = [r for r in scored if r.get("answer_type") == kind]
            out.append(
                f"  {kind}: accuracy {sum(1 for r in part if r['correct']) / len(part):.3f}, "
                f"mean score {np.mean([r['score'] for r in part]):.3f} (n={len(part)})"
            )
        return out
