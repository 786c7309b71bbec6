"""The question text each dataset hands the model, in one place.

A template wraps the dataset's question before the model family's own prompt (chat template,
``USER: <image> ... ASSISTANT:``) wraps it in turn. VQAv2-style datasets append the instruction
the study used for short answers; POPE's questions go in as they are. ``--prompt-template``
overrides the default; the template used is part of the run's identity (it changes the numbers).
"""

from __future__ import annotations

SHORT_ANSWER = "{question}\nAnswer the question using a single word or phrase."

DATASET_PROMPTS: dict[str, str] = {
    "pope": "{question}",
    "shapes-pope": "{question}",
    "vqav2": SHORT_ANSWER,
    "shapes-vqa": SHORT_ANSWER,
}


def question_template(dataset: str, override: str | None = None) -> str:
    """The template for `dataset`: `override` when given (it must contain ``{question}``)."""
    if override is not None:
        if "{question}" not in override:
            raise ValueError(
                f"--prompt-template {override!r} has no {{question}} placeholder; "
                "e.g. '{question} Answer briefly.'"
            )
        return override
    try:
        return DATASET_PROMPTS[dataset]
    except KeyError:
        raise ValueError(
            f"no prompt for dataset {dataset!r}; expected one of {', '.join(DATASET_PROMPTS)}"
        ) from None


def apply_template(template: str, question: str) -> str:
    """The question as the model sees it (``str.replace``: braces in a question stay as they are)."""
    return template.replace("{question}", question)
