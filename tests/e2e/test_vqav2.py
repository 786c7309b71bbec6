"""VQAv2 loading (official JSON pair, Parquet layout, id list, seeded sample), bad rows recorded in
``failures``, shapes-VQA in the same layout, and an ingest whose every row is rejected."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from vrp.cli import main
from vrp.ingest.datasets import generate_shapes_vqa, load_dataset, load_vqav2, load_vqav2_parquet
from vrp.ingest.datasets.vqav2 import image_name, stratified_sample
from vrp.lake import open_lake

TOY = Path(__file__).resolve().parents[2] / "vrp" / "toys" / "toy-qwen2vl"


def _answers(*words: str) -> list[dict]:
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


def _annotation(qid: int, image_id: int, main: str, answers: list, atype: str = "other") -> dict:
    return {
        "question_id": qid,
        "image_id": image_id,
        "question_type": "what color is the",
        "answer_type": atype,
        "multiple_choice_answer": main,
        "answers": answers,
    }


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def vqa(tmp_path: Path) -> Path:
    """Good questions 11, 12, 21; and one of each bad kind (see test_bad_rows...)."""
    images = tmp_path / "val2014"
    images.mkdir()
    for image_id, colour in ((1, (200, 10, 10)), (2, (10, 10, 200))):
        (images / image_name("val2014", image_id)).write_bytes(_jpeg(colour))
    questions = [
        {"image_id": 1, "question": "What color is it?", "question_id": 11},
        {"image_id": 1, "question": "How many?", "question_id": 12},
        {"image_id": 2, "question": "What color is it?", "question_id": 21},
        {"image_id": 2, "question": "No annotation?", "question_id": 22},
        {"image_id": 3, "question": "Missing image?", "question_id": 31},
        {"image_id": 2, "question": "Empty answers?", "question_id": 23},
        {"image_id": 2, "question": "Odd answer?", "question_id": 24},
        {"image_id": 1, "question": "Again?", "question_id": 11},
    ]
    annotations = [
        _annotation(11, 1, "red", _answers(*["red"] * 9, "orange")),
        _annotation(12, 1, "1", _answers(*["1"] * 6, *["one"] * 4), "number"),
        _annotation(21, 2, "blue", _answers(*["blue"] * 10)),
        _annotation(31, 3, "x", _answers("x")),
        _annotation(23, 2, "x", []),
        _annotation(24, 2, "x", [{"answer": 7}]),
        _annotation(99, 2, "orphan", _answers("orphan")),
    ]
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({"data_subtype": "val2014", "questions": questions})
    )
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return tmp_path


def _files(vqa: Path) -> tuple[Path, Path, Path]:
    return (
        vqa / "v2_OpenEnded_mscoco_val2014_questions.json",
        vqa / "v2_mscoco_val2014_annotations.json",
        vqa / "val2014",
    )


def test_official_json_pair(vqa: Path) -> None:
    questions, annotations, images = _files(vqa)
    samples, errors = load_vqav2(questions, images, annotations)
    assert [s.question_id for s in samples] == ["11", "12", "21"]
    first = samples[0]
    assert first.split == "val2014" and first.task == "open" and first.label == "red"
    assert first.answers == ("red",) * 9 + ("orange",)
    assert (first.question_type, first.answer_type) == ("what color is the", "other")
    assert first.image_path.endswith("COCO_val2014_000000000001.jpg") and first.object is None
    assert samples[1].answer_type == "number"
    assert len({s.sample_id for s in samples}) == 3


def test_bad_rows_are_errors_with_a_message_and_the_rest_loads(vqa: Path) -> None:
    questions, annotations, images = _files(vqa)
    _samples, errors = load_vqav2(questions, images, annotations)
    why = {e.question_id: e.error for e in errors}
    assert "has no annotation" in why["22"]
    assert "image file not found" in why["31"]
    assert "empty or missing answers list" in why["23"]
    assert "is not a string" in why["24"]
    assert "has no question" in why["99"]
    assert any("duplicate question_id 11" in e.error for e in errors)
    assert len(errors) == 6


def test_without_annotations_answers_are_unscored(vqa: Path) -> None:
    questions, _annotations, images = _files(vqa)
    samples, errors = load_vqav2(questions, images)
    assert {s.question_id for s in samples} == {"11", "12", "21", "22", "23", "24"}
    assert all(s.answers is None and s.label is None for s in samples)
    assert {e.question_id for e in errors} == {"31", "11"}


def test_parquet_layout_gives_the_same_samples(vqa: Path) -> None:
    questions, annotations, images = _files(vqa)
    reference, _ = load_vqav2(questions, images, annotations)
    rows = []
    for s in reference:
        data = Path(s.image_path).read_bytes()
        rows.append(
            {
                "question_id": int(s.question_id),
                "question": s.question,
                "image_id": int(s.image_id),
                "image": {"bytes": data, "path": Path(s.image_path).name},
                "question_type": s.question_type,
                "answer_type": s.answer_type,
                "multiple_choice_answer": s.label,
                "answers": _answers(*s.answers),
            }
        )
    rows.append({**rows[0], "question_id": 77, "image": {"bytes": b"not an image", "path": None}})
    rows.append({**rows[0], "question_id": 78, "answers": []})
    path = vqa / "vqav2_val2014.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    samples, errors = load_vqav2_parquet(path)
    assert [s.sample_id for s in samples] == [s.sample_id for s in reference]
    assert [s.answers for s in samples] == [s.answers for s in reference]
    assert [s.label for s in samples] == [s.label for s in reference]
    assert samples[0].image_bytes is not None and samples[0].image_path is None
    assert {e.question_id: e.error for e in errors}.keys() == {"77", "78"}
    assert "cannot be decoded" in errors[0].error or "not a picture" in errors[0].error
    again, _ = load_dataset("vqav2", data_file=path, question_ids=["21", "5"])
    assert [s.question_id for s in again] == ["21"]


def test_id_list_and_seeded_stratified_sample(vqa: Path, tmp_path: Path) -> None:
    questions, annotations, images = _files(vqa)
    samples, errors = load_dataset(
        "vqav2",
        questions_file=questions,
        annotations_file=annotations,
        image_dir=images,
        question_ids=["12", "404"],
    )
    assert [s.question_id for s in samples] == ["12"]
    assert any(e.question_id == "404" and "not in" in e.error for e in errors)

    folder = generate_shapes_vqa(tmp_path / "svqa", images=12, seed=2)
    full, _ = load_dataset("shapes-vqa", data_dir=folder)
    picked = stratified_sample(full, 15, seed=3)
    assert len(picked) == 15 and picked == stratified_sample(full, 15, seed=3)
    assert picked != stratified_sample(full, 15, seed=4)
    share = Counter(s.answer_type for s in full)
    got = Counter(s.answer_type for s in picked)
    for kind, count in share.items():  # each answer type within one of its proportional share
        assert abs(got[kind] - 15 * count / len(full)) < 1, (kind, got, share)
    assert [s.question_id for s in picked] == [s.question_id for s in full if s in picked]  # file order kept


def test_shapes_vqa_is_deterministic_and_varied(tmp_path: Path) -> None:
    a = generate_shapes_vqa(tmp_path / "a", images=5, seed=9)
    b = generate_shapes_vqa(tmp_path / "b", images=5, seed=9)
    for name in ("shapes_vqa_questions.json", "shapes_vqa_annotations.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    samples, errors = load_dataset("shapes-vqa", data_dir=a)
    assert not errors and all(len(s.answers) == 10 for s in samples)
    assert {s.answer_type for s in samples} == {"number", "other", "yes/no"}
    assert {"how many", "what color is the", "what is in the", "is there a"} <= {
        s.question_type for s in samples
    }
    counts = [s for s in samples if s.question_type == "how many"]
    assert any(len(set(s.answers)) > 1 for s in counts)  # "2" / "two" / "2 shapes"
    result = CliRunner().invoke(main, ["data", "shapes-vqa", "--out", str(tmp_path / "c"), "--images", "3"])
    assert result.exit_code == 0 and "answer types:" in result.output


def test_ingest_records_bad_rows_in_failures_and_scores_the_rest(vqa: Path, tmp_path: Path) -> None:
    questions, annotations, images = _files(vqa)
    lake = tmp_path / "lake"
    args = ["ingest", "run", "--model", str(TOY), "--dataset", "vqav2", "--questions-file", str(questions)]
    args += ["--annotations-file", str(annotations), "--image-dir", str(images), "--self-consistency", "2"]
    result = CliRunner().invoke(main, [*args, "--lake", str(lake)])
    assert result.exit_code == 0, result.output
    assert (
        "3 new samples" in result.output and "6 failed" in result.output and "mean VQA score" in result.output
    )
    opened = open_lake(lake)
    rows = opened.sql(
        "select question_id, task, score, answers, p_yes from samples order by question_id"
    ).fetchall()
    assert [r[0] for r in rows] == ["11", "12", "21"]
    assert all(r[1] == "open" and r[2] is not None and len(r[3]) == 10 and r[4] is None for r in rows)
    failed = dict(opened.sql("select question_id, error from failures").fetchall())
    assert set(failed) == {"22", "31", "23", "24", "99", "11"} and "has no annotation" in failed["22"]
    config = json.loads(opened.sql("select config from runs").fetchall()[0][0])
    assert config["task"] == {"task": "open", "correct_rule": "lenient", "truth_token": "teacher-forced"}
    assert config["question_template"].endswith("Answer the question using a single word or phrase.")


def test_a_run_with_every_row_rejected_exits_non_zero(vqa: Path, tmp_path: Path) -> None:
    questions, annotations, _images = _files(vqa)
    args = ["ingest", "run", "--model", str(TOY), "--dataset", "vqav2", "--questions-file", str(questions)]
    args += ["--annotations-file", str(annotations), "--image-dir", str(tmp_path / "nowhere")]
    for extra in ([], ["--strict"]):
        result = CliRunner().invoke(main, [*args, *extra, "--lake", str(tmp_path / "lake")])
        assert result.exit_code != 0
        assert "no question could be read: all" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "lake").exists()
