"""VQAv2-format open questions: the official JSON pair and the single-file Parquet layout.

The official release is two files: questions ``{"data_subtype": "val2014", "questions":
[{"image_id", "question", "question_id"}]}`` and annotations ``{"annotations": [{"question_id",
"image_id", "question_type", "answer_type", "multiple_choice_answer", "answers": [10 x {"answer",
"answer_confidence", "answer_id"}]}]}``; images are ``COCO_<data_subtype>_<image_id:012d>.jpg``.
Annotations are optional (test-dev has none): such questions are answered and stored, not scored.
The public Hugging Face copy is one Parquet file per shard with one row per question, the
annotation fields inline and the image embedded (a ``{"bytes", "path"}`` struct or raw bytes).
shapes-VQA (``shapes_vqa.py``) writes the official layout, so one reader serves both.

Offered: :func:`load_vqav2` (official pair) and :func:`load_vqav2_parquet`, both returning the
samples and a :class:`SampleError` per rejected question (a question without an annotation or
the reverse, a missing image, an empty answers list, a non-string answer, a duplicate question
id), and :func:`select_questions` (an id list, or a seeded sample stratified by answer type).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vrp.ingest.datasets.pope import PopeFormatError, Sample, SampleError, SampleLoadError, decode_rgb_bytes
from vrp.lake.identity import content_hash, make_sample_id

_SUBTYPE_PATTERN = re.compile(r"((?:train|val|test-dev|test)20\d\d)")


class VqaFormatError(PopeFormatError):
    """A VQA file that cannot be read at all (missing, not JSON, wrong top-level shape)."""


def _read_json(path: Path, key: str) -> tuple[dict[str, Any], list[Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise VqaFormatError(f"VQA file not found: {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VqaFormatError(f"cannot read VQA file {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise VqaFormatError(f"{path} is not a VQA {key} file: expected a JSON object with a '{key}' list")
    return data, data[key]


def data_subtype(path: Path, header: dict[str, Any]) -> str:
    """``val2014`` from the questions file's ``data_subtype`` field, else from its name."""
    value = header.get("data_subtype")
    if isinstance(value, str) and value.strip():
        return value.strip()
    found = _SUBTYPE_PATTERN.findall(path.name)
    if len(set(found)) == 1:
        return found[0]
    raise VqaFormatError(
        f"cannot tell the image set of {path.name} (no 'data_subtype' field, and the file name names none "
        "such as val2014): COCO image names depend on it"
    )


def image_name(subtype: str, image_id: int) -> str:
    """The official COCO file name of an image: ``COCO_val2014_000000262148.jpg``."""
    return f"COCO_{subtype}_{int(image_id):012d}.jpg"


def _question_id(raw: Any) -> str | None:
    if isinstance(raw, bool) or not isinstance(raw, int | str) or not str(raw).strip():
        return None
    return str(raw).strip()


def _answers(raw: Any) -> tuple[tuple[str, ...] | None, str | None]:
    """(human answers, error): a list of strings or of {"answer": str} objects, non-empty."""
    if not isinstance(raw, list | tuple) or len(raw) == 0:
        return None, f"empty or missing answers list ({raw!r:.40})"
    answers = []
    for item in raw:
        value = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(value, str):
            return None, f"answer {value!r:.40} is not a string"
        answers.append(value)
    return tuple(answers), None


class _Builder:
    """Validates rows one by one into samples and errors (shared by both layouts)."""

    def __init__(self, dataset: str, split: str) -> None:
        self.dataset, self.split = dataset, split
        self.samples: list[Sample] = []
        self.errors: list[SampleError] = []
        self.seen: set[str] = set()

    def reject(self, question_id: str, error: str, sample_id: str | None = None) -> None:
        self.errors.append(SampleError(self.dataset, self.split, question_id, sample_id, "load", error))

    def add(
        self,
        where: str,
        row: dict[str, Any],
        annotation: dict[str, Any] | None,
        image: tuple[str | None, bytes | None, str | None, str | None],
    ) -> None:
        """`image` is (path, embedded bytes, content hash, error)."""
        question_id = _question_id(row.get("question_id"))
        if question_id is None:
            self.reject(f"<{where}>", f"{where}: question_id must be an integer or a non-empty string")
            return
        if question_id in self.seen:
            self.reject(question_id, f"{where}: duplicate question_id {question_id} (the first is kept)")
            return
        self.seen.add(question_id)
        path, data, image_hash, image_error = image
        sample_id = make_sample_id(self.dataset, self.split, question_id, image_hash) if image_hash else None
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            self.reject(question_id, f"{where}: empty or missing question text", sample_id)
            return
        answers = label = question_type = answer_type = None
        if annotation is not None:
            answers, error = _answers(annotation.get("answers"))
            if error is not None:
                self.reject(question_id, f"{where}: {error}", sample_id)
                return
            label = annotation.get("multiple_choice_answer")
            if label is not None and not isinstance(label, str):
                self.reject(
                    question_id, f"{where}: multiple_choice_answer {label!r:.40} is not a string", sample_id
                )
                return
            question_type = annotation.get("question_type")
            answer_type = annotation.get("answer_type")
        if image_error is not None:
            self.reject(question_id, f"{where}: {image_error}")
            return
        image_id = row.get("image_id")
        self.samples.append(
            Sample(
                sample_id=sample_id,
                dataset=self.dataset,
                split=self.split,
                question_id=question_id,
                image_id=None if image_id is None else str(image_id),
                question=question.strip(),
                object=None,
                label=label,
                image_path=path,
                task="open",
                answers=answers,
                question_type=str(question_type) if question_type is not None else None,
                answer_type=str(answer_type) if answer_type is not None else None,
                image_bytes=data,
            )
        )


def _file_image(
    folder: Path, name: str, cache: dict[str, tuple]
) -> tuple[str | None, None, str | None, str | None]:
    """(path, None, content hash, error) of an image file, read and fully decoded once."""
    if name not in cache:
        path = folder / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            cache[name] = (None, None, None, f"image file not found: {path}")
        except OSError as exc:
            cache[name] = (None, None, None, f"cannot read image file {path}: {exc}")
        else:
            try:
                decode_rgb_bytes(data, str(path))
            except SampleLoadError as exc:
                cache[name] = (None, None, None, str(exc))
            else:
                cache[name] = (str(path), None, content_hash(data), None)
    return cache[name]


def load_vqav2(
    questions_file: str | Path,
    image_dir: str | Path,
    annotations_file: str | Path | None = None,
    *,
    dataset: str = "vqav2",
    question_ids: Collection[str] | None = None,
) -> tuple[list[Sample], list[SampleError]]:
    """The official JSON pair: samples in question-file order, and an error per rejected question.

    `question_ids` keeps only those questions (ids the file lacks are errors), before any image is read.
    """
    qpath = Path(questions_file)
    header, questions = _read_json(qpath, "questions")
    split = data_subtype(qpath, header)
    annotations: dict[str, dict[str, Any]] | None = None
    builder = _Builder(dataset, split)
    if annotations_file is not None:
        apath = Path(annotations_file)
        _, rows = _read_json(apath, "annotations")
        annotations = {}
        for number, row in enumerate(rows, start=1):
            qid = _question_id(row.get("question_id")) if isinstance(row, dict) else None
            if qid is None:
                builder.reject(
                    f"<annotation {number}>", f"{apath.name} annotation {number}: no usable question_id"
                )
            elif qid not in annotations:
                annotations[qid] = row
    wanted = None if question_ids is None else {str(q) for q in question_ids}
    cache: dict[str, tuple] = {}
    asked: set[str] = set()
    for number, row in enumerate(questions, start=1):
        where = f"{qpath.name} question {number}"
        if not isinstance(row, dict):
            builder.reject(f"<question {number}>", f"{where}: expected a JSON object")
            continue
        qid = _question_id(row.get("question_id"))
        if wanted is not None and qid not in wanted:
            continue
        if qid is not None:
            asked.add(qid)
        annotation = None
        if annotations is not None:
            annotation = annotations.get(qid) if qid is not None else None
            if annotation is None and qid is not None:
                builder.reject(
                    qid, f"{where}: question {qid} has no annotation in {Path(annotations_file).name}"
                )
                continue
        image_id = row.get("image_id")
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            builder.reject(
                qid or f"<question {number}>", f"{where}: image_id must be an integer, got {image_id!r}"
            )
            continue
        builder.add(where, row, annotation, _file_image(Path(image_dir), image_name(split, image_id), cache))
    if annotations is not None:
        for qid in annotations:
            if qid not in asked and (wanted is None or qid in wanted):
                builder.reject(qid, f"annotation of question {qid} has no question in {qpath.name}")
    if wanted is not None:
        for qid in sorted(wanted - asked - set(annotations or {})):
            builder.reject(qid, f"question id {qid} from the id list is not in {qpath.name}")
    return builder.samples, builder.errors


def _embedded(value: Any) -> tuple[bytes | None, str | None]:
    """Image bytes from a Parquet cell: raw bytes or a {"bytes", "path"} struct."""
    if isinstance(value, bytes | bytearray):
        return bytes(value), None
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes | bytearray):
        return bytes(value["bytes"]), None
    return None, f"no embedded image bytes (got {type(value).__name__})"


def load_vqav2_parquet(
    data_file: str | Path,
    *,
    dataset: str = "vqav2",
    split: str | None = None,
    question_ids: Collection[str] | None = None,
) -> tuple[list[Sample], list[SampleError]]:
    """The Hugging Face single-file layout: one row per question, annotations inline, image embedded."""
    import pyarrow.parquet as pq

    path = Path(data_file)
    try:
        table = pq.read_table(path)
    except FileNotFoundError as exc:
        raise VqaFormatError(f"VQA Parquet file not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise VqaFormatError(f"cannot read {path} as Parquet: {exc}") from exc
    missing = [c for c in ("question_id", "question", "image") if c not in table.column_names]
    if missing:
        raise VqaFormatError(
            f"{path.name} lacks the column(s) {', '.join(missing)} of the VQAv2 Parquet layout"
        )
    found = _SUBTYPE_PATTERN.findall(path.name)
    builder = _Builder(dataset, split or (found[0] if len(set(found)) == 1 else "all"))
    wanted = None if question_ids is None else {str(q) for q in question_ids}
    asked: set[str] = set()
    has_answers = "answers" in table.column_names
    for number, row in enumerate(table.to_pylist(), start=1):
        qid = _question_id(row.get("question_id"))
        if wanted is not None and qid not in wanted:
            continue
        if qid is not None:
            asked.add(qid)
        data, error = _embedded(row.get("image"))
        if data is not None:
            try:
                decode_rgb_bytes(data, f"{path.name} row {number}")
            except SampleLoadError as exc:
                data, error = None, str(exc)
        image = (None, data, content_hash(data) if data is not None else None, error)
        annotation = row if has_answers and row.get("answers") is not None else None
        if has_answers and annotation is None:
            annotation = {"answers": []}  # a row of an annotated file without answers is an error
        builder.add(f"{path.name} row {number}", row, annotation, image)
    if wanted is not None:
        for qid in sorted(wanted - asked):
            builder.reject(qid, f"question id {qid} from the id list is not in {path.name}")
    return builder.samples, builder.errors


def read_question_ids(path: str | Path) -> list[str]:
    """Question ids from a file with one id a line (blank lines and ``#`` comments skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise VqaFormatError(f"cannot read the question id list {path}: {exc}") from exc
    ids = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not ids:
        raise VqaFormatError(f"the question id list {path} is empty")
    return ids


def stratified_sample(samples: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    """`n` samples drawn without replacement, each answer type getting its share (largest remainder).

    Deterministic for a seed; the result keeps the input order. All samples when `n` >= their number.
    """
    if n >= len(samples):
        return list(samples)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        groups[sample.answer_type or ""].append(index)
    keys = sorted(groups)
    exact = [n * len(groups[k]) / len(samples) for k in keys]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(keys)), key=lambda i: (counts[i] - exact[i], keys[i]))[: n - sum(counts)]:
        counts[i] += 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for key, count in zip(keys, counts, strict=True):
        chosen.extend(int(i) for i in rng.choice(groups[key], size=count, replace=False))
    return [samples[i] for i in sorted(chosen)]
