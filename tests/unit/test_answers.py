"""Answer parsing and self-consistency agreement on hand-built answers."""

from __future__ import annotations

import pytest

from vrp.ingest.answers import majority_answer
from vrp.tasks.yesno import parse_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", ("yes", "ok")),
        ("Yes, there is a dog.", ("yes", "ok")),  # the study's whole-string match scored this wrong
        (" no.", ("no", "ok")),
        ("NO!", ("no", "ok")),
        ("There is no dog", ("no", "ok")),
        ("yesterday I saw it", (None, "unknown")),
        ("", (None, "unknown")),
        ("a cat", (None, "unknown")),
    ],
)
def test_parse_answer(text: str, expected: tuple[str | None, str]) -> None:
    assert parse_answer(text) == expected


def test_majority_and_agreement() -> None:
    assert majority_answer(["yes", "yes", "no", "yes"]) == ("yes", 0.75)
    assert majority_answer(["no"] * 10) == ("no", 1.0)


def test_unknown_answers_count_against_agreement() -> None:
    answer, agreement = majority_answer([None, None, None, "yes", "no"])
    assert answer is None and agreement == pytest.approx(0.6)


def test_ties_go_to_the_first_answer_reaching_the_top_count() -> None:
    assert majority_answer(["no", "yes", "yes", "no"]) == ("no", 0.5)
    assert majority_answer(["yes", "no"]) == ("yes", 0.5)


def test_empty_answer_list_is_an_error() -> None:
    with pytest.raises(ValueError):
        majority_answer([])
