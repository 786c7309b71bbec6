"""The yes/no task (POPE, shapes-POPE): the first yes/no word, scored against a yes/no label.

First-token statistics sum the probability of every single-token spelling of "yes" and of
"no" (``answer_token_ids``), so ``p_yes`` is comparable across tokenizers; the truth token is
the spelling of the label the model itself scores highest.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image

from vrp.tasks.base import Gold, Task, TaskError

if TYPE_CHECKING:  # type-only: tasks import no model code at run time
    from transformers import PreTrainedTokenizerBase

    from vrp.ingest.models.base import Adapter


YES_NO = ("yes", "no")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_text(text: str) -> str:
    """Lowercase, punctuation replaced by spaces, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def parse_answer(text: str) -> tuple[str | None, str]:
    """(answer, parse_status): the first "yes"/"no" word, else (None, "unknown").

    The study's code scored POPE answers by whole-string equality, so "Yes, there is a dog."
    counted as wrong; everything without a yes/no word stays ``unknown`` (never scored silently)
    and the raw text is stored beside the parsed answer.
    """
    for word in normalise_text(text).split():
        if word in YES_NO:
            return word, "ok"
    return None, "unknown"


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, word: str) -> list[int]:
    """Ids of every single first token that spells ``word`` in some casing, with or without a leading space.

    Two independent routes, because tokenizers disagree on how a leading space is written: encoding the
    variants (``"yes"``, ``" Yes"``, ...) and keeping the first token when it decodes to the whole word,
    and looking the word up directly with each tokenizer family's space marker (``▁`` SentencePiece,
    ``Ġ`` byte-level BPE). Summing probabilities over all of them is what makes p_yes comparable across
    families (docs/ARCHITECTURE.md section 4).
    """
    casings = {word.lower(), word.capitalize(), word.upper()}
    found: set[int] = set()
    unk = getattr(tokenizer, "unk_token_id", None)
    for casing in casings:
        for text in (casing, " " + casing):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids[0] != unk and tokenizer.decode([ids[0]]).strip() == casing:
                found.add(int(ids[0]))
        for marker in ("", "▁", "Ġ", " "):
            token_id = tokenizer.convert_tokens_to_ids(marker + casing)
            if isinstance(token_id, int) and token_id != unk and token_id >= 0:
                found.add(token_id)
    return sorted(found)


def yes_no_ids(adapter: Adapter) -> tuple[list[int], list[int]]:
    """The tokenizer's single-token spellings of yes and no, or :class:`TaskError` if it has none."""
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
        "p_yes": probs[:, list(yes_ids)].sum(-1).cpu().numpy(),
        "p_no": probs[:, list(no_ids)].sum(-1).cpu().numpy(),
        "yes_no_margin": (yes_lse - no_lse).cpu().numpy(),
    }


class YesNoTask(Task):
    """See the module docstring."""

    name: ClassVar[str] = "yesno"
    metrics_query: ClassVar[str] = "pope_metrics"
    token_columns: ClassVar[tuple[str, ...]] = ("p_yes", "p_no", "yes_no_margin")
    lens_columns: ClassVar[tuple[str, ...]] = ("lens_yes_no_margin",)
    margin_column: ClassVar[str] = "yes_no_margin"
    margin_label: ClassVar[str] = "yes/no margin"

    def check(self, adapter: Adapter) -> None:
        yes_no_ids(adapter)

    def identity(self, adapter: Adapter) -> dict[str, Any]:
        yes, no = yes_no_ids(adapter)
        return {"task": self.name, "yes_ids": yes, "no_ids": no}

    def truth_ids(
        self,
        adapter: Adapter,
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

    def truth_candidates(
        self,
        adapter: Adapter,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        golds: Sequence[Gold],
    ) -> list[int]:
        """Every variant of the labels' words: :meth:`truth_ids` picks one from the final logits."""
        yes, no = yes_no_ids(adapter)
        return sorted({i for gold in golds for i in (yes if gold.label == "yes" else no)})

    def token_stats(self, adapter: Adapter, logits: torch.Tensor) -> dict[str, np.ndarray]:
        return yes_no_stats(logits, *yes_no_ids(adapter))

    def lens_stats(self, adapter: Adapter, logits: torch.Tensor) -> dict[str, np.ndarray]:
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
