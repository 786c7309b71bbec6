"""VQA answer normalisation, the official VQA accuracy and the three ``correct`` rules (pure functions).

The VQA benchmark scores a short free-text answer against ten human answers after a fixed
normalisation (Antol et al., 2015; the VQA evaluation's answer processing): punctuation removed
or replaced by a space, periods kept only inside numbers, lower case, number words turned into
digits, articles dropped, and apostrophe-less contractions ("dont") restored ("don't").
VRP normalises the human answers the same way as the prediction, so "two" among the human
answers matches a predicted "2".

Accuracy: for each of the ten human answers, ``min(1, matches among the other nine / 3)``,
averaged over the ten; 3 matching answers of 10 give 0.9, one gives 0.3.

``correct`` follows one of three rules, recorded in the run's identity:

* ``lenient`` (the default, the study's label): the normalised prediction equals the normalised
  ``multiple_choice_answer``, or one is a substring of the other ("dog" for "black dog");
* ``exact``: equal after normalisation;
* ``vqa``: accuracy at least 0.5.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

CORRECT_RULES: tuple[str, ...] = ("lenient", "exact", "vqa")
DEFAULT_CORRECT_RULE = "lenient"

# punctuation the VQA processing removes (glued to a word) or turns into a space
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_IN_NUMBER = re.compile(r"(?<!\d)\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions whose apostrophe-less spelling is not itself a common word ("its", "well", "id",
# "ill", "were", "shell" are left alone); every spelling with some apostrophes missing maps back.
_CONTRACTIONS = [
    "ain't",
    "aren't",
    "can't",
    "could've",
    "couldn't",
    "couldn't've",
    "didn't",
    "doesn't",
    "don't",
    "hadn't",
    "hadn't've",
    "hasn't",
    "haven't",
    "he'd've",
    "he's",
    "how'd",
    "how'll",
    "how's",
    "i'd've",
    "i'm",
    "i've",
    "isn't",
    "it'd",
    "it'd've",
    "it'll",
    "let's",
    "ma'am",
    "mightn't",
    "mightn't've",
    "might've",
    "mustn't",
    "must've",
    "needn't",
    "not've",
    "o'clock",
    "oughtn't",
    "'ow's'at",
    "shan't",
    "she'd've",
    "she's",
    "should've",
    "shouldn't",
    "shouldn't've",
    "somebody'd",
    "somebody'd've",
    "somebody'll",
    "somebody's",
    "someone'd",
    "someone'd've",
    "someone'll",
    "someone's",
    "something'd",
    "something'd've",
    "something'll",
    "that's",
    "there'd",
    "there'd've",
    "there're",
    "there's",
    "they'd",
    "they'd've",
    "they'll",
    "they're",
    "they've",
    "'twas",
    "wasn't",
    "we'd've",
    "we've",
    "weren't",
    "what'll",
    "what're",
    "what's",
    "what've",
    "when's",
    "where'd",
    "where's",
    "where've",
    "who'd",
    "who'd've",
    "who'll",
    "who're",
    "who's",
    "who've",
    "why'll",
    "why're",
    "why's",
    "won't",
    "would've",
    "wouldn't",
    "wouldn't've",
    "y'all",
    "y'all'll",
    "y'all'd've",
    "you'd",
    "you'd've",
    "you'll",
    "you're",
    "you've",
]


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for word in _CONTRACTIONS:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        for n in range(1, len(cuts) + 1):
            for dropped in itertools.combinations(cuts, n):
                variant = "".join(ch for i, ch in enumerate(word) if i not in dropped)
                table.setdefault(variant, word)
    return table


_CONTRACTION_TABLE = _contraction_table()


def _punctuation(text: str) -> str:
    out = text
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_IN_NUMBER.sub("", out)


def _digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTION_TABLE.get(word, word))
    return " ".join(words)


def normalise_vqa_answer(text: str) -> str:
    """The VQA evaluation's answer processing: ``"Two."`` -> ``"2"``, ``"the dog"`` -> ``"dog"``."""
    return _digits_articles(_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of a prediction against the human answers (normalised both sides)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    pred = normalise_vqa_answer(prediction)
    gold = [normalise_vqa_answer(a) for a in answers]
    if len(gold) == 1:
        return float(pred == gold[0])
    total = 0.0
    for i in range(len(gold)):
        matches = sum(1 for j, other in enumerate(gold) if j != i and other == pred)
        total += min(1.0, matches / 3)
    return total / len(gold)


def is_correct(rule: str, prediction: str, reference: str, score: float) -> bool:
    """``correct`` under one rule; `reference` is the ``multiple_choice_answer``, `score` the accuracy."""
    if rule == "vqa":
        return score >= 0.5
    pred, ref = normalise_vqa_answer(prediction), normalise_vqa_answer(reference)
    if rule == "exact":
        return pred == ref
    if rule == "lenient":
        return pred == ref or (bool(pred) and bool(ref) and (pred in ref or ref in pred))
    raise ValueError(f"unknown correct rule {rule!r}; expected one of {', '.join(CORRECT_RULES)}")
