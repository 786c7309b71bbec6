"""POPE-format yes/no object questions: reading, validating and identifying them.

POPE (Li et al., 2023) publishes one file per split (``coco_pope_random.json`` ...) of JSON lines
``{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in
the image?", "label": "yes"}`` beside a folder of images. This module offers:

- :class:`Sample`: one validated question, with a ``sample_id`` that is the same for every model
  (dataset, split, question id and the image's content hash, see ``vrp.lake.identity``).
- :class:`SampleError`: one rejected question and why; the run records it, reports it at the end
  and never scores it. One bad line never stops the others from loading.
- :func:`load_pope` (a file and an image folder -> samples and errors), :func:`load_image`
  (a sample -> RGB image or :class:`SampleLoadError`), :func:`parse_object` (the object named by a
  question) and :func:`dataset_fingerprint` (one hash of everything that changes the numbers).

The shapes-POPE generator (``shapes.py``) writes this same format, so both go through one reader.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vrp.lake.identity import canonical_json, content_hash, make_sample_id

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
LABELS: tuple[str, ...] = ("yes", "no")
REQUIRED_FIELDS: tuple[str, ...] = ("question_id", "image", "text", "label")

# "Is there a dining table in the image?" -> "dining table". POPE always uses this template; "an",
# "picture"/"photo" and a missing question mark are accepted so hand-written files also parse.
_OBJECT_PATTERN = re.compile(
    r"^\s*is\s+there\s+(?:an?\s+|any\s+)?(?P<object>.+?)\s+in\s+the\s+(?:image|picture|photo)\s*[?.]?\s*$",
    re.IGNORECASE,
)
_SOURCE_PATTERN = re.compile(r"(?:^|[^a-z])(coco|aokvqa|gqa)(?:[^a-z]|$)")
_SPLIT_PATTERN = re.compile(r"(?:^|[^a-z])(random|popular|adversarial)(?:[^a-z]|$)")


class SampleLoadError(Exception):
    """An image that cannot be read as a picture (missing, unreadable or undecodable)."""


class PopeFormatError(ValueError):
    """A POPE file that cannot be read at all (missing, not JSON, no split): nothing to score."""


@dataclass(frozen=True)
class Sample:
    """One validated yes/no question about one image.

    ``image_id`` is POPE's ``image`` field as written in the file; ``image_path`` is where it was
    found. ``sample_id`` joins rows of every model's run on the same question.
    """

    sample_id: str
    dataset: str
    split: str
    question_id: str
    image_id: str
    question: str
    object: str | None  # the object a POPE question names (None for open questions)
    label: str
    image_path: str | None  # None when the image travels embedded (image_bytes)
    category: str | None = None
    task: str = "yesno"  # which answer task scores it (vrp.tasks)
    answers: tuple[str, ...] | None = None  # the human answers (VQAv2's ten), when there are any
    question_type: str | None = None
    answer_type: str | None = None
    source: str | None = None  # where the image comes from (POPE: coco, aokvqa or gqa)
    # the encoded image when a data file embeds it (Parquet, TSV) rather than naming a file
    image_bytes: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class SampleError:
    """One question that was rejected, and why (``stage`` is ``"load"`` for everything found here).

    ``sample_id`` is set when the question still has a well-defined identity (a readable question
    id and image); it is ``None`` for duplicates and for rows without an id or image.
    """

    dataset: str
    split: str
    question_id: str
    sample_id: str | None
    stage: str
    error: str


def parse_object(question: str) -> str | None:
    """The object a POPE question asks about, lower-cased; ``None`` when the question is not of
    the form "Is there a {object} in the image?"."""
    match = _OBJECT_PATTERN.match(question)
    if match is None:
        return None
    return " ".join(match.group("object").lower().split())


def infer_split(path: str | Path) -> str:
    """The split named in a POPE file name (``coco_pope_adversarial.json`` -> ``adversarial``).

    Raises :class:`PopeFormatError` when the name does not say, because guessing a split would
    silently mislabel every row of the run.
    """
    found = set(_SPLIT_PATTERN.findall(Path(path).name.lower()))
    if len(found) != 1:
        raise PopeFormatError(
            f"cannot tell the POPE split from the file name {Path(path).name!r}: "
            f"pass the split explicitly (one of {', '.join(SPLITS)})"
        )
    return found.pop()


def infer_source(path: str | Path) -> str | None:
    """The image source named in a POPE file name (``aokvqa_pope_random.json`` -> ``aokvqa``), or None.

    POPE's three sources are pooled under ``dataset = pope``; keeping the source apart lets a
    study report them separately.
    """
    found = set(_SOURCE_PATTERN.findall(Path(path).name.lower()))
    return found.pop() if len(found) == 1 else None


def _records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed record, parse error) for each record of a POPE file in any layout.

    JSON lines or a JSON array (POPE's own), lmms-eval's Parquet or VLMEvalKit's TSV; the table
    layouts are turned into POPE's record shape with the image bytes under ``image_bytes``.
    A UTF-8 byte-order mark (as Windows editors write) is dropped. In a JSON-lines file a line that
    is not valid UTF-8 is that line's error, and the other lines still load.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _table_records(path, _parquet_rows(path))
        return
    if suffix == ".tsv":
        yield from _table_records(path, _tsv_rows(path))
        return
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise PopeFormatError(f"POPE file not found: {path}") from exc
    except OSError as exc:
        raise PopeFormatError(f"cannot read POPE file {path}: {exc}") from exc
    data = data.removeprefix(b"\xef\xbb\xbf")
    if data.lstrip().startswith(b"["):
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise PopeFormatError(f"{path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from exc
        except json.JSONDecodeError as exc:
            raise PopeFormatError(f"{path} starts like a JSON array but is not valid JSON: {exc}") from exc
        for index, row in enumerate(rows):
            yield index + 1, row, None
        return
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, None, f"line {number} is not UTF-8 text (byte {exc.start} of the line)"
            continue
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as exc:
            yield number, None, f"line {number} is not valid JSON ({exc.msg})"


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except FileNotFoundError as exc:
        raise PopeFormatError(f"POPE file not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise PopeFormatError(f"cannot read {path} as Parquet: {exc}") from exc


def _tsv_rows(path: Path) -> list[dict[str, Any]]:
    csv.field_size_limit(2**31 - 1)  # base64 images are far longer than csv's default field limit
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle, delimiter="\t"))
    except FileNotFoundError as exc:
        raise PopeFormatError(f"POPE file not found: {path}") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PopeFormatError(f"cannot read {path} as a TSV file: {exc}") from exc


def _image_cell(value: Any) -> bytes | None:
    """Image bytes from a table cell: raw bytes, a {"bytes": ...} struct, or base64 text."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes | bytearray):
        return bytes(value["bytes"])
    if isinstance(value, str) and value.strip():
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


def _table_records(path: Path, rows: list[dict[str, Any]]) -> Iterator[tuple[int, Any, str | None]]:
    """lmms-eval Parquet (question_id, question, answer, image, category, image_source) and
    VLMEvalKit TSV (index, image as base64, question, answer, category) rows as POPE records.

    Both store POPE's split in ``category``; the image's name, when given, in ``image_source``.
    """
    if rows and not {"question", "answer", "image"} <= set(rows[0]):
        raise PopeFormatError(
            f"{path.name} has columns {sorted(rows[0])}: expected lmms-eval's Parquet (question_id, "
            "question, answer, image, category) or VLMEvalKit"
            "'s TSV (index, image, question, answer, category)"
        )
    for number, row in enumerate(rows, start=1):
        question_id = row.get("question_id", row.get("index"))
        category = row.get("category")
        image_name = row.get("image_source") or f"{path.name} row {number}"
        yield (
            number,
            {
                "question_id": int(question_id)
                if isinstance(question_id, str) and question_id.isdigit()
                else question_id,
                "image": image_name,
                "image_bytes": _image_cell(row.get("image")),
                "text": row.get("question"),
                "label": row.get("answer"),
                "split": category if category in SPLITS else None,
                "source": row.get("source") or infer_source(str(image_name)),
            },
            None,
        )


class _ImageIndex:
    """Reads, hashes and decodes each image once (POPE's three splits share 500 images)."""

    def __init__(self, image_dir: Path) -> None:
        self.image_dir = image_dir
        self._seen: dict[str, tuple[str | None, str | None]] = {}

    def lookup(self, image: str) -> tuple[str | None, str | None]:
        """(content hash, error) of one image; exactly one of them is ``None``."""
        if image not in self._seen:
            self._seen[image] = self._check(self.image_dir / image)
        return self._seen[image]

    @staticmethod
    def _check(path: Path) -> tuple[str | None, str | None]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None, f"image file not found: {path}"
        except OSError as exc:
            return None, f"cannot read image file {path}: {exc}"
        try:
            decode_rgb(path)
        except SampleLoadError as exc:
            return None, str(exc)
        return content_hash(data), None


def _embedded_image(data: bytes | None, where: str) -> tuple[str | None, str | None]:
    """(content hash, error) of an image embedded in a table row."""
    if data is None:
        return None, "no readable image in the row (expected image bytes or base64 text)"
    try:
        decode_rgb_bytes(data, where)
    except SampleLoadError as exc:
        return None, str(exc)
    return content_hash(data), None


def decode_rgb_bytes(data: bytes, where: str) -> Image.Image:
    """Fully decode an embedded image into RGB, or raise :class:`SampleLoadError` naming `where`."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _rgb(image, where)
    except UnidentifiedImageError as exc:
        raise SampleLoadError(f"embedded image is not a picture PIL can read: {where}") from exc
    except Image.DecompressionBombError as exc:
        raise SampleLoadError(
            f"embedded image is too large to decode safely ({exc}); shrink it or raise "
            f"PIL.Image.MAX_IMAGE_PIXELS: {where}"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise SampleLoadError(f"embedded image cannot be decoded ({exc}): {where}") from exc


#: Modes of 16-bit integer pixels (full range 0..65535).
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_8bit(image: Image.Image, path: str | Path) -> Image.Image:
    """An 8-bit greyscale copy of a 16-bit, 32-bit integer or float image.

    ``convert("RGB")`` clips such pixels to 0..255, so a 16-bit scan turns white and would be
    scored as if the model had seen it. 16-bit pixels (and 32-bit ones within 0..65535, which is
    how PIL opens some 16-bit PNGs) are scaled from 0..65535; float pixels from 0..1. Anything
    else has no range to scale from and is refused.
    """
    values = np.asarray(image)
    if image.mode in _MODES_16BIT or (
        image.mode == "I" and values.size and values.min() >= 0 and values.max() <= 65535
    ):
        scaled = (values.astype(np.uint32) * 255 + 32767) // 65535
    elif image.mode == "F" and np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1:
        scaled = np.rint(values.astype(np.float64) * 255)
    else:
        low, high = (values.min(), values.max()) if values.size else (0, 0)
        raise SampleLoadError(
            f"image has {image.mode} pixels from {low} to {high}, outside 0..65535 (integers) or "
            f"0..1 (floats), so they cannot be scaled to 8 bits; convert it to an 8-bit image: {path}"
        )
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _rgb(image: Image.Image, where: str | Path) -> Image.Image:
    """A decoded image as 8-bit RGB (high-bit-depth pixels scaled, not clipped)."""
    if image.mode in (*_MODES_16BIT, "I", "F"):
        return _to_8bit(image, where).convert("RGB")
    return image.convert("RGB")


def decode_rgb(path: str | Path) -> Image.Image:
    """Fully decode an image file into RGB, or raise :class:`SampleLoadError` saying what is wrong.

    The whole image is decoded (not only the header) so a truncated file is caught when the
    dataset loads, not halfway through a GPU run. An image above PIL's decompression-bomb
    limit is refused like any unreadable one, and high-bit-depth pixels are scaled to 8 bits.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return _rgb(image, path)
    except FileNotFoundError as exc:
        raise SampleLoadError(f"image file not found: {path}") from exc
    except UnidentifiedImageError as exc:
        raise SampleLoadError(f"image file is not a picture PIL can read: {path}") from exc
    except Image.DecompressionBombError as exc:
        raise SampleLoadError(
            f"image is too large to decode safely ({exc}); shrink it or raise PIL.Image.MAX_IMAGE_PIXELS: "
            f"{path}"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise SampleLoadError(f"image file cannot be decoded ({exc}): {path}") from exc


def load_image(sample: Sample) -> Image.Image:
    """The sample's image as RGB (grey, palette and RGBA images are converted)."""
    if sample.image_bytes is not None:
        return decode_rgb_bytes(sample.image_bytes, f"{sample.dataset} question {sample.question_id}")
    if sample.image_path is None:
        raise SampleLoadError(f"{sample.dataset} question {sample.question_id} has no image")
    return decode_rgb(sample.image_path)


def load_pope(
    pope_file: str | Path,
    image_dir: str | Path,
    *,
    dataset: str = "pope",
    split: str | None = None,
) -> tuple[list[Sample], list[SampleError]]:
    """Read one POPE split: valid samples in file order, and one :class:`SampleError` per bad row.

    ``split`` defaults to the one named in the file name. A row is rejected (and the rest still
    load) for: invalid JSON, a missing field, an empty question, a question that names no object,
    a label other than yes/no, a question id seen before in the file (the first one is kept), and
    a missing or undecodable image. A file that cannot be read at all raises
    :class:`PopeFormatError`.
    """
    path = Path(pope_file)
    table = path.suffix.lower() in (".parquet", ".tsv")
    if split is None and table:  # the table layouts name each row's split in its category
        found = set(_SPLIT_PATTERN.findall(path.name.lower()))
        split = found.pop() if len(found) == 1 else None
    elif split is None:
        split = infer_split(path)
    file_split = split
    images = _ImageIndex(Path(image_dir))
    file_source = infer_source(path) if dataset == "pope" else None
    samples: list[Sample] = []
    errors: list[SampleError] = []
    first_line: dict[str, int] = {}

    def reject(question_id: str, error: str, sample_id: str | None = None) -> None:
        errors.append(SampleError(dataset, split or "unknown", question_id, sample_id, "load", error))

    for number, row, parse_error in _records(path):
        where = f"{path.name} {'row' if table else 'line'} {number}"
        split = file_split or (row.get("split") if isinstance(row, dict) else None)
        if parse_error is not None:
            reject(f"<line {number}>", f"{path.name}: {parse_error}")
            continue
        if not isinstance(row, dict):
            reject(f"<line {number}>", f"{where}: expected a JSON object, got {type(row).__name__}")
            continue
        raw_id = row.get("question_id")
        question_id = (
            str(raw_id) if isinstance(raw_id, int | str) and str(raw_id).strip() else f"<line {number}>"
        )
        missing = [name for name in REQUIRED_FIELDS if row.get(name) is None]
        if missing:
            reject(question_id, f"{where}: missing field(s) {', '.join(missing)}")
            continue
        if isinstance(raw_id, bool) or not isinstance(raw_id, int | str) or not str(raw_id).strip():
            reject(
                question_id, f"{where}: question_id must be an integer or a non-empty string, got {raw_id!r}"
            )
            continue
        if question_id in first_line:
            reject(
                question_id,
                f"{where}: duplicate question_id {question_id} (first on line "
                f"{first_line[question_id]}, which is kept)",
            )
            continue
        first_line[question_id] = number
        if split is None:
            reject(
                question_id, f"{where}: category {row.get('category')!r} names no POPE split; pass --split"
            )
            continue
        image = row["image"]
        if not isinstance(image, str) or not image.strip():
            reject(question_id, f"{where}: image must be a non-empty file name, got {image!r}")
            continue
        embedded = row.get("image_bytes")
        if table:
            image_hash, image_error = _embedded_image(embedded, where)
        else:
            image_hash, image_error = images.lookup(image)
        sample_id = make_sample_id(dataset, split, question_id, image_hash) if image_hash else None
        question = row["text"]
        if not isinstance(question, str) or not question.strip():
            reject(question_id, f"{where}: empty question text", sample_id)
            continue
        label = row["label"]
        normalised_label = label.strip().lower() if isinstance(label, str) else None
        if normalised_label not in LABELS:
            reject(question_id, f"{where}: label must be yes or no, got {label!r}", sample_id)
            continue
        explicit_object = row.get("object")
        obj = (
            explicit_object.strip().lower()
            if isinstance(explicit_object, str) and explicit_object.strip()
            else parse_object(question)
        )
        if obj is None:
            reject(
                question_id,
                f"{where}: cannot find the object in {question!r} "
                "(expected 'Is there a {object} in the image?')",
                sample_id,
            )
            continue
        if image_error is not None:
            reject(question_id, f"{where}: {image_error}")
            continue
        category = row.get("category")
        source = row.get("source")
        samples.append(
            Sample(
                sample_id=sample_id,
                dataset=dataset,
                split=split,
                question_id=question_id,
                image_id=image,
                question=question.strip(),
                object=obj,
                label=normalised_label,
                image_path=None if table else str(images.image_dir / image),
                image_bytes=embedded if table else None,
                category=str(category) if category is not None else None,
                source=source.strip().lower() if isinstance(source, str) and source.strip() else file_source,
            )
        )
    return samples, errors


def dataset_fingerprint(samples: Iterable[Sample]) -> str:
    """One hash of everything about a sample set that changes a run's numbers.

    It covers each sample's identity (which already hashes the image bytes), question text and
    label, so a run config that includes it changes when the POPE file or an image changes, and
    not when the folder is merely moved.
    """
    rows = sorted((s.sample_id, s.question, s.label, s.object, list(s.answers or ())) for s in samples)
    return content_hash(canonical_json(rows).encode())
