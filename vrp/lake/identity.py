"""Deterministic identities for lake rows.

``sample_id`` names one question and is the same for every model, so runs of different models
join on it. ``run_id`` hashes everything that changes the numbers (docs/ARCHITECTURE.md section 6), so the
same configuration always lands on the same run and a rerun resumes instead of duplicating.
The code version is deliberately *not* hashed: a resume after a bug fix is still a resume.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

RUN_ID_LENGTH = 16
SAMPLE_ID_LENGTH = 20


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal configs hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(data: bytes) -> str:
    """Hex SHA-256 of raw bytes (images are identified by their bytes, not their file names)."""
    return hashlib.sha256(data).hexdigest()


def make_sample_id(dataset: str, split: str, question_id: str | int, image_hash: str) -> str:
    """Identity of one question: dataset, split, question id and the image's content hash."""
    key = canonical_json([dataset, split, str(question_id), image_hash])
    return hashlib.sha256(key.encode()).hexdigest()[:SAMPLE_ID_LENGTH]


def make_run_id(config: dict[str, Any]) -> str:
    """Identity of one run: a short hash of the canonical JSON of everything that changes the numbers."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:RUN_ID_LENGTH]
