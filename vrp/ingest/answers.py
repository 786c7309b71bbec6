"""Self-consistency agreement over parsed answers (a pure function, the same for every task).

Parsing itself belongs to the answer's task (``vrp.tasks``): the first yes/no word for yes/no
questions, the normalised first line for open ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


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
