"""Answering and scoring one (edited) forward: the one place that knows what "right" means.

What this module offers:

* :func:`first_token_scores` - every per-row first-token number an intervention stores: the
  task's own statistics (``p_yes``, ``p_no``, ``yes_no_margin`` for yes/no), the task-free
  ``token_entropy``, and the truth token's ``truth_prob`` / ``truth_margin`` (its logit minus the
  best other logit; > 0 exactly when greedy decoding starts right).
* :func:`answer_batch` - greedy answer, parsed and scored by the task, plus those numbers.

Kept apart from the kinds on purpose: the task (``vrp.tasks``: yes/no, open answers) decides what
a truth token and a correct answer are, and no intervention kind has to know (docs/ARCHITECTURE.md
section 4.8).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from vrp.ingest.capture import first_token_stats, first_token_truth
from vrp.ingest.models.base import Adapter
from vrp.tasks import Gold, Task, get_task
from vrp.tasks.base import as_gold


def first_token_scores(
    adapter: Adapter,
    logits: torch.Tensor,
    golds: Sequence[Gold],
    task: Task,
    images: Sequence[Image.Image],
    questions: Sequence[str],
) -> list[dict[str, float | None]]:
    """Per row of next-token logits [B, V]: the task's statistics, entropy and truth-token numbers."""
    logits = logits.float().cpu()
    stats = task.token_stats(adapter, logits)
    entropy = first_token_stats(logits)["token_entropy"]
    truth_ids = task.truth_ids(adapter, images, questions, golds, logits)
    truth = first_token_truth(logits, truth_ids.clamp(min=0))
    rows = []
    for b in range(len(golds)):
        known = bool(truth_ids[b] >= 0)  # -1: the sample has no right answer to score against
        rows.append(
            {
                **{key: float(values[b]) for key, values in stats.items()},
                "token_entropy": float(entropy[b]),
                "truth_prob": float(truth["truth_prob"][b]) if known else None,
                "truth_margin": float(truth["truth_margin"][b]) if known else None,
            }
        )
    return rows


def answer_batch(
    adapter: Adapter,
    inputs: dict[str, torch.Tensor],
    golds: Sequence[Gold | str],
    *,
    task: Task | None = None,
    images: Sequence[Image.Image] | None = None,
    questions: Sequence[str] | None = None,
    max_new_tokens: int = 8,
) -> list[dict[str, Any]]:
    """Greedy answer and first-token scores per row (the base run's decoding, without any capture).

    Parsing, scoring and the task's own statistics come from ``task`` (yes/no by default); the
    truth token's probability and margin are those of the (edited) model's logits.
    """
    task = task if task is not None else get_task("yesno")
    golds = [as_gold(g) for g in golds]
    prompt_len = int(inputs["input_ids"].shape[1])
    with torch.no_grad():
        out = adapter.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=adapter.tokenizer.pad_token_id,
        )
    scores = first_token_scores(adapter, out.logits[0], golds, task, images or [], questions or [])
    texts = adapter.tokenizer.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True)
    rows = []
    for b, gold in enumerate(golds):
        answer, status = task.parse(texts[b])
        correct, score = task.score(answer, gold)
        rows.append(
            {
                "answer_text": texts[b],
                "answer": answer,
                "parse_status": status,
                "correct": correct,
                "score": score,
                **scores[b],
            }
        )
    return rows
