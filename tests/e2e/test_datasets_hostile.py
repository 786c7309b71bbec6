"""Loader inputs a red team used to break a run: decompression bombs, 16-bit images, a UTF-8
byte-order mark, a non-UTF-8 line, and load rejects that lost their question id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vrp.ingest.datasets import SampleLoadError, load_pope
from vrp.ingest.datasets.pope import decode_rgb
from vrp.ingest.models.tiny import build_tiny
from vrp.ingest.run import IngestOptions, run_ingest
from vrp.lake import open_lake

QUESTION = "Is there a {} in the image?"


def _rows(image: str, n: int = 2, start: int = 1) -> list[dict]:
    objects = ["cat", "dog", "red circle", "blue square"]
    return [
        {"question_id": start + i, "image": image, "text": QUESTION.format(objects[i % 4]), "label": "yes"}
        for i in range(n)
    ]


def _write_lines(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_an_image_over_the_decompression_bomb_limit_is_one_rejected_question(tmp_path, monkeypatch):
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (64, 64), (0, 0, 0)).save(img / "huge.png")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(img / "ok.png")
    # 64*64 pixels is more than twice the limit: PIL raises DecompressionBombError on open
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(SampleLoadError, match="too large"):
        decode_rgb(img / "huge.png")
    _write_lines(tmp_path / "pope_random.jsonl", _rows("huge.png", 1) + _rows("ok.png", 1, start=2))
    samples, errors = load_pope(tmp_path / "pope_random.jsonl", img)
    assert [s.question_id for s in samples] == ["2"]
    assert len(errors) == 1 and errors[0].question_id == "1" and "too large" in errors[0].error


def _expected_8bit(values16: np.ndarray) -> np.ndarray:
    # independent: exact rounding of v * 255 / 65535 with Python fractions
    return np.array([[round(int(v) * 255 / 65535) for v in row] for row in values16], dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_images_are_scaled_to_8_bits_not_clipped_to_white(tmp_path, fmt):
    values = np.array([[0, 257, 1000, 30000], [40000, 65535, 128, 65280]], dtype=np.uint16)
    path = tmp_path / f"scan.{fmt.lower()}"
    Image.fromarray(values).save(path, format=fmt)
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")  # how PIL opens it
    rgb = np.asarray(decode_rgb(path))
    assert rgb.shape == (2, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], _expected_8bit(values))


def test_float_images_in_0_1_are_scaled_and_others_are_refused(tmp_path):
    good = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(good).save(tmp_path / "f.tiff")
    rgb = np.asarray(decode_rgb(tmp_path / "f.tiff"))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 128, 255])
    Image.fromarray(np.array([[0.0, 4000.0]], dtype=np.float32)).save(tmp_path / "g.tiff")
    with pytest.raises(SampleLoadError, match="8 bits"):
        decode_rgb(tmp_path / "g.tiff")
    Image.fromarray(np.array([[-5, 100000]], dtype=np.int32)).save(tmp_path / "i.tiff")
    with pytest.raises(SampleLoadError, match="8 bits"):
        decode_rgb(tmp_path / "i.tiff")


@pytest.mark.parametrize("layout", ["lines", "array"])
def test_a_utf8_byte_order_mark_costs_no_row(tmp_path, layout):
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(img / "a.png")
    rows = _rows("a.png", 3)
    text = "".join(json.dumps(r) + "\n" for r in rows) if layout == "lines" else json.dumps(rows)
    (tmp_path / "pope_popular.json").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    samples, errors = load_pope(tmp_path / "pope_popular.json", img)
    assert [s.question_id for s in samples] == ["1", "2", "3"] and errors == []


def test_a_line_that_is_not_utf8_rejects_that_line_only(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(img / "a.png")
    lines = [json.dumps(r).encode("utf-8") for r in _rows("a.png", 3)]
    lines[1] = lines[1].replace(b"dog", b"d\xf6g")  # latin-1 o-umlaut
    (tmp_path / "pope_random.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    samples, errors = load_pope(tmp_path / "pope_random.jsonl", img)
    assert [s.question_id for s in samples] == ["1", "3"]
    assert len(errors) == 1 and "line 2" in errors[0].error and "UTF-8" in errors[0].error


def test_load_rejects_keep_their_question_id_in_the_failures_table(tmp_path):
    torch.set_num_threads(1)
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(img / "a.png")
    (img / "broken.png").write_bytes(b"not a png")
    rows = _rows("a.png", 1) + _rows("broken.png", 1, start=7)
    rows.append({"question_id": 8, "image": "a.png", "text": QUESTION.format("cat"), "label": "maybe"})
    _write_lines(tmp_path / "pope_random.jsonl", rows)
    model = build_tiny("llava", tmp_path / "tiny", seed=0, num_layers=1)
    options = IngestOptions(
        model=str(model),
        dataset="pope",
        pope_file=str(tmp_path / "pope_random.jsonl"),
        image_dir=str(img),
        self_consistency=0,
        max_new_tokens=2,
    )
    lake_dir = str(tmp_path / "lake")
    run_ingest(options, lake_dir, echo=lambda _line: None)
    failures = open_lake(lake_dir).arrow("failures").to_pylist()
    got = sorted((f["question_id"], f["stage"], f["split"]) for f in failures)
    assert got == [("7", "load", "random"), ("8", "load", "random")]
    run_ingest(options, lake_dir, echo=lambda _line: None)  # a rerun records them once
    assert open_lake(lake_dir).arrow("failures").num_rows == 2
