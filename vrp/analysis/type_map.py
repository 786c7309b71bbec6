"""Question-type tags from a user's map file, and VQA metrics per tag (pure functions).

The study groups VQAv2 questions into its own tags (object identification, person
identification, location, yes/no, other) with a mapping it never published, so VRP invents none:
``--type-map FILE`` maps question-type *prefixes* to tags, and a question type takes the tag of
its longest matching prefix (``"what color is the"`` matches ``"what color"``).

File formats: a JSON object ``{"what is the": "object identification", ...}``, or text lines
``prefix<TAB>tag`` (or ``prefix,tag``); blank lines and ``#`` comments are skipped.

Usage::

    tags = read_type_map("study_types.tsv")
    tag_of("what color is the", tags)             # -> "other" (or None: no prefix matches)
    tag_metrics(vqa_metrics_rows, tags)           # per run and tag: n, accuracy, mean_score
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

UNTAGGED = "(untagged)"


class TypeMapError(ValueError):
    """A type map file that cannot be read; the message says what is expected."""


def read_type_map(path: str | Path) -> dict[str, str]:
    """Prefix -> tag from a JSON object or a two-column text file (see the module docstring)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TypeMapError(f"cannot read the type map {path}: {exc}") from exc
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TypeMapError(f"type map {path} is not valid JSON: {exc}") from exc
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise TypeMapError(f"type map {path}: every key and value must be a string (prefix -> tag)")
        mapping = dict(data)
    else:
        mapping = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t") if "\t" in line else line.split(",")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise TypeMapError(f"type map {path} line {number}: expected 'prefix<TAB>tag', got {line!r}")
            mapping[parts[0].strip()] = parts[1].strip()
    if not mapping:
        raise TypeMapError(f"type map {path} maps nothing")
    return {prefix.lower(): tag for prefix, tag in mapping.items()}


def tag_of(question_type: str | None, type_map: Mapping[str, str]) -> str | None:
    """The tag of the longest prefix of `question_type` in the map (case-insensitive), or None."""
    if not question_type:
        return None
    key = question_type.lower()
    best = max((p for p in type_map if key.startswith(p)), key=len, default=None)
    return None if best is None else type_map[best]


def tag_metrics(rows: Sequence[Mapping[str, Any]], type_map: Mapping[str, str]) -> list[dict[str, Any]]:
    """Per (model, dataset, run, tag): n, n_scored, accuracy and mean score, from ``vqa_metrics`` rows.

    The question-type rows are pooled by tag, each weighted by its number of scored answers, which
    is what the accuracy over the tag's questions is. Question types no prefix matches are
    reported as :data:`UNTAGGED`.
    """
    cells: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for row in rows:
        if row["level"] != "question_type":
            continue
        tag = tag_of(None if row["type"] == "(none)" else row["type"], type_map) or UNTAGGED
        cell = cells.setdefault(
            (row["model"], row["dataset"], row["run_id"], tag), {"n": 0, "s": 0, "c": 0.0, "v": 0.0}
        )
        scored = int(row["n_scored"])
        cell["n"] += int(row["n"])
        cell["s"] += scored
        if scored:
            cell["c"] += float(row["accuracy"]) * scored
            cell["v"] += float(row["mean_score"]) * scored
    return [
        {
            "model": model,
            "dataset": dataset,
            "run_id": run_id,
            "tag": tag,
            "n": int(c["n"]),
            "n_scored": int(c["s"]),
            "accuracy": c["c"] / c["s"] if c["s"] else None,
            "mean_score": c["v"] / c["s"] if c["s"] else None,
        }
        for (model, dataset, run_id, tag), c in sorted(cells.items())
    ]
