"""Answer parsing and self-consistency agreement (pure functions).

The study's code scored POPE answers by whole-string equality, so "Yes, there is a dog." counted
as wrong. VRP takes the first yes/no word and keeps everything else as ``unknown`` (never scored
silently); the raw text is always stored beside the parsed answer.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

YES_NO = ("yes", "no")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_text(text: str) -> str:
    """Lowercase, punctuation replaced by spaces, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def parse_answer(text: str) -> tuple[str | None, str]:
    """(answer, parse_status): the first "yes"/"no" word, else (None, "unknown")."""
    for word in normalise_text(text).split():
        if word in YES_NO:
            return word, "ok"
    return None, "unknown"


def majority_answer(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """(majority normalised answer, agreement = its share of all K answers).

    Unparsable answers count in the denominator and as their own answer "unknown", so K answers
    that are mostly gibberish give low agreement rather than a confident yes. Ties are broken by
    the first answer, in sample order, that reaches the top count, so the result does not depend
    on dictionary order.
    """
    if not answers:
        raise ValueError("majority_answer needs at least one answer")
    keys = ["unknown" if a is None else a for a in answers]
    counts = Counter(keys)
    top = max(counts.values())
    winner = next(key for key in keys if counts[key] == top)
    return (None if winner == "unknown" else winner), top / len(keys)
