"""POPE loader and shapes-POPE generator: format, validation, identity, determinism, structure."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vrp.cli import main
from vrp.ingest.datasets import (
    PopeFormatError,
    SampleLoadError,
    dataset_fingerprint,
    generate_shapes_pope,
    infer_split,
    load_dataset,
    load_image,
    load_pope,
    parse_object,
)
from vrp.lake.identity import make_sample_id

ROWS = [
    {"question_id": 1, "image": "a.png", "text": "Is there a dining table in the image?", "label": "yes"},
    {"question_id": 2, "image": "a.png", "text": "Is there a snowboard in the image?", "label": "no"},
    {"question_id": 3, "image": "b.jpg", "text": "Is there an orange in the image?", "label": "Yes"},
    {"question_id": "q4", "image": "b.jpg", "text": "Is there a tennis racket in the image?", "label": "no"},
]


def _images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (10, 200, 30)).save(folder / "a.png")
    Image.new("L", (8, 8), 77).save(folder / "b.jpg", format="JPEG")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pope_dir(tmp_path: Path) -> Path:
    _images(tmp_path / "img")
    (tmp_path / "coco_pope_adversarial.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "coco_pope_random_array.json").write_text(json.dumps(ROWS, indent=2))
    return tmp_path


def test_reads_published_json_lines(pope_dir: Path) -> None:
    samples, errors = load_pope(pope_dir / "coco_pope_adversarial.json", pope_dir / "img")
    assert errors == []
    assert [s.question_id for s in samples] == ["1", "2", "3", "q4"]
    assert [s.object for s in samples] == ["dining table", "snowboard", "orange", "tennis racket"]
    assert [s.label for s in samples] == ["yes", "no", "yes", "no"]
    assert {s.split for s in samples} == {"adversarial"}
    assert samples[0].image_id == "a.png" and samples[0].image_path == str(pope_dir / "img" / "a.png")
    assert samples[2].question == "Is there an orange in the image?"
    expected = make_sample_id("pope", "adversarial", "3", _sha(pope_dir / "img" / "b.jpg"))
    assert samples[2].sample_id == expected
    assert len({s.sample_id for s in samples}) == 4


def test_json_array_gives_the_same_questions(pope_dir: Path) -> None:
    lines, _ = load_pope(pope_dir / "coco_pope_adversarial.json", pope_dir / "img", split="random")
    array, errors = load_pope(pope_dir / "coco_pope_random_array.json", pope_dir / "img")
    assert errors == []
    assert array == lines


def test_split_from_file_name_or_explicit(tmp_path: Path) -> None:
    assert infer_split("coco_pope_random.json") == "random"
    assert infer_split("/x/aokvqa_pope_popular.jsonl") == "popular"
    assert infer_split("adversarial.jsonl") == "adversarial"
    with pytest.raises(PopeFormatError, match="pass the split"):
        infer_split("questions.jsonl")
    with pytest.raises(PopeFormatError, match="not found"):
        load_pope(tmp_path / "coco_pope_random.json", tmp_path)


@pytest.mark.parametrize(
    ("question", "obj"),
    [
        ("Is there a dining table in the image?", "dining table"),
        ("is there an  Orange in the picture", "orange"),
        ("Is there a hair drier in the image ?", "hair drier"),
        ("How many dogs are there?", None),
    ],
)
def test_parse_object(question: str, obj: str | None) -> None:
    assert parse_object(question) == obj


def test_each_bad_input_has_its_own_error(tmp_path: Path) -> None:
    _images(tmp_path / "img")
    (tmp_path / "img" / "broken.jpg").write_bytes(b"this is not a jpeg")
    noisy = np.random.default_rng(0).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "img" / "whole.png")
    whole = (tmp_path / "img" / "whole.png").read_bytes()
    (tmp_path / "img" / "truncated.png").write_bytes(whole[: len(whole) * 2 // 3])
    q = "Is there a cat in the image?"
    lines = [
        json.dumps({"question_id": 1, "image": "a.png", "text": q, "label": "yes"}),
        json.dumps({"question_id": 2, "image": "missing.png", "text": q, "label": "no"}),
        json.dumps({"question_id": 3, "image": "broken.jpg", "text": q, "label": "no"}),
        json.dumps({"question_id": 4, "image": "truncated.png", "text": q, "label": "no"}),
        json.dumps({"question_id": 5, "image": "a.png", "text": q, "label": "maybe"}),
        json.dumps({"question_id": 1, "image": "b.jpg", "text": q, "label": "no"}),
        json.dumps({"question_id": 7, "image": "a.png", "text": "   ", "label": "no"}),
        json.dumps({"question_id": 8, "image": "a.png", "text": q}),
        "{not json",
        json.dumps({"question_id": 10, "image": "a.png", "text": "What colour is the cat?", "label": "no"}),
        json.dumps({"question_id": 11, "image": "b.jpg", "text": q, "label": "NO"}),
    ]
    (tmp_path / "coco_pope_popular.json").write_text("\n".join(lines) + "\n")
    samples, errors = load_pope(tmp_path / "coco_pope_popular.json", tmp_path / "img")

    assert [s.question_id for s in samples] == ["1", "11"]
    assert samples[1].label == "no"
    by_id = {e.question_id: e.error for e in errors}
    assert len(errors) == 9 and len(by_id) == 9
    assert "image file not found" in by_id["2"]
    assert "not a picture" in by_id["3"]
    assert "cannot be decoded" in by_id["4"] and "truncated" in by_id["4"]
    assert "label must be yes or no, got 'maybe'" in by_id["5"]
    assert "duplicate question_id 1" in by_id["1"]
    assert "empty question" in by_id["7"]
    assert "missing field(s) label" in by_id["8"]
    assert "line 9 is not valid JSON" in by_id["<line 9>"]
    assert "cannot find the object" in by_id["10"]
    assert all(e.stage == "load" and e.split == "popular" and e.dataset == "pope" for e in errors)
    # a question whose image is fine keeps its identity, so the failure can be joined to other runs
    assert next(e for e in errors if e.question_id == "5").sample_id == make_sample_id(
        "pope", "popular", "5", _sha(tmp_path / "img" / "a.png")
    )
    assert next(e for e in errors if e.question_id == "1").sample_id is None


def test_sample_ids_stable_across_loads_and_folders(
    pope_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    first, _ = load_pope(pope_dir / "coco_pope_adversarial.json", pope_dir / "img")
    second, _ = load_pope(pope_dir / "coco_pope_adversarial.json", pope_dir / "img")
    assert [s.sample_id for s in first] == [s.sample_id for s in second]
    moved = tmp_path_factory.mktemp("moved")
    _images(moved / "elsewhere")
    third, _ = load_pope(pope_dir / "coco_pope_adversarial.json", moved / "elsewhere")
    assert [s.sample_id for s in third] == [s.sample_id for s in first]
    assert dataset_fingerprint(third) == dataset_fingerprint(first)
    # other image bytes -> other identity and fingerprint
    Image.new("RGB", (12, 10), (10, 200, 31)).save(moved / "elsewhere" / "a.png")
    fourth, _ = load_pope(pope_dir / "coco_pope_adversarial.json", moved / "elsewhere")
    assert fourth[0].sample_id != first[0].sample_id and fourth[2].sample_id == first[2].sample_id
    assert dataset_fingerprint(fourth) != dataset_fingerprint(first)


def test_load_image_is_rgb_or_clear_error(pope_dir: Path) -> None:
    samples, _ = load_pope(pope_dir / "coco_pope_adversarial.json", pope_dir / "img")
    grey = load_image(samples[2])
    assert grey.mode == "RGB" and grey.size == (8, 8)
    assert np.asarray(grey)[0, 0].tolist() == [77, 77, 77]
    (pope_dir / "img" / "a.png").unlink()
    with pytest.raises(SampleLoadError, match="image file not found"):
        load_image(samples[0])


def test_load_dataset_pope(pope_dir: Path) -> None:
    samples, errors = load_dataset(
        "pope", pope_file=pope_dir / "coco_pope_adversarial.json", image_dir=pope_dir / "img"
    )
    assert len(samples) == 4 and not errors
    with pytest.raises(ValueError, match="--pope-file"):
        load_dataset("pope")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("coco")


# ---------------------------------------------------------------- shapes-POPE


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_pope(tmp_path_factory.mktemp("shapes") / "set", images=120, seed=11)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shapes_same_seed_same_bytes(shapes: Path, tmp_path: Path) -> None:
    again = generate_shapes_pope(tmp_path / "again", images=120, seed=11)
    first, second = _tree(shapes), _tree(again)
    assert len(first) == 120 + 4
    assert first == second
    other = _tree(generate_shapes_pope(tmp_path / "other", images=120, seed=12))
    assert other["images/shapes_000000.png"] != first["images/shapes_000000.png"]


def _asked(question: str) -> str:
    match = re.fullmatch(r"Is there an? (.+) in the image\?", question)
    assert match is not None, question
    return match.group(1)


def _boxes(folder: Path) -> dict:
    return json.loads((folder / "boxes.json").read_text())


def test_shapes_labels_agree_with_boxes_and_pixels(shapes: Path) -> None:
    boxes = _boxes(shapes)
    colours = {c["name"]: np.array(c["colour"]) for c in boxes["classes"]}
    for name, entry in boxes["images"].items():
        classes = [o["class"] for o in entry["objects"]]
        assert 1 <= len(classes) <= 4 and len(set(classes)) == len(classes)
        pixels = np.asarray(Image.open(shapes / "images" / name).convert("RGB")).astype(int)
        assert pixels.shape == (80, 80, 3)
        for obj in entry["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 80
            centre = pixels[(y0 + y1 - 1) // 2, (x0 + x1 - 1) // 2]
            assert np.abs(centre - colours[obj["class"]]).max() <= 18  # base colour +- jitter
    for split in ("random", "popular", "adversarial"):
        rows = [json.loads(line) for line in (shapes / f"{split}.jsonl").read_text().splitlines()]
        assert len({r["question_id"] for r in rows}) == len(rows)
        per_image: dict[str, list[str]] = {}
        for r in rows:
            obj = _asked(r["text"])
            present = {o["class"] for o in boxes["images"][r["image"]]["objects"]}
            assert obj in colours
            assert (r["label"] == "yes") == (obj in present), r
            per_image.setdefault(r["image"], []).append(r["label"])
        assert set(per_image) == set(boxes["images"])
        assert all(labels.count("yes") == labels.count("no") >= 1 for labels in per_image.values())


def test_shapes_negative_sampling_means_what_pope_means(shapes: Path) -> None:
    boxes = _boxes(shapes)
    names = [c["name"] for c in boxes["classes"]]
    index = {n: i for i, n in enumerate(names)}
    present = {img: [index[o["class"]] for o in e["objects"]] for img, e in boxes["images"].items()}
    cooc = np.zeros((len(names), len(names)))
    freq = np.zeros(len(names))
    for classes in present.values():
        for a in classes:
            freq[a] += 1
            for b in classes:
                cooc[a, b] += a != b

    def negatives(split: str) -> tuple[float, float]:
        """Mean co-occurrence of each negative with its image's objects, and mean frequency."""
        score, frequency = [], []
        for line in (shapes / f"{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["label"] == "no":
                neg = index[_asked(r["text"])]
                score.append(cooc[present[r["image"]], neg].sum())
                frequency.append(freq[neg])
        return float(np.mean(score)), float(np.mean(frequency))

    random_cooc, random_freq = negatives("random")
    popular_cooc, popular_freq = negatives("popular")
    adversarial_cooc, _ = negatives("adversarial")
    assert adversarial_cooc > 1.3 * random_cooc
    assert adversarial_cooc > popular_cooc
    assert popular_freq > 1.3 * random_freq


def test_shapes_read_by_pope_loader(shapes: Path) -> None:
    samples, errors = load_dataset("shapes-pope", data_dir=shapes)
    assert errors == []
    assert [s.split for s in samples[:1]] == ["random"] and {s.split for s in samples} == {
        "random",
        "popular",
        "adversarial",
    }
    assert len({s.sample_id for s in samples}) == len(samples)
    only, _ = load_dataset("shapes-pope", data_dir=shapes, split="popular")
    assert only == [s for s in samples if s.split == "popular"]
    assert all(s.dataset == "shapes-pope" and " " in s.object for s in only)


def test_shapes_default_folder_is_generated_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VRP_CACHE_DIR", str(tmp_path / "cache"))
    samples, errors = load_dataset("shapes-pope", split="adversarial")
    assert not errors and len(samples) > 100
    folder = Path(samples[0].image_path).parent.parent
    assert folder.parent == tmp_path / "cache"
    assert _boxes(folder)["generator"]["seed"] == 1234
    stamp = (folder / "boxes.json").stat().st_mtime_ns
    again, _ = load_dataset("shapes-pope", split="adversarial")
    assert again == samples and (folder / "boxes.json").stat().st_mtime_ns == stamp


def test_cli_writes_a_set_and_refuses_foreign_folders(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        main, ["data", "shapes-pope", "--out", str(tmp_path / "s"), "--images", "6", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert _tree(tmp_path / "s") == _tree(generate_shapes_pope(tmp_path / "ref", images=6, seed=3))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    result = runner.invoke(main, ["data", "shapes-pope", "--out", str(tmp_path / "foreign"), "--images", "2"])
    assert result.exit_code != 0 and "not a shapes-POPE folder" in result.output
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me"


def test_pope_source_from_the_file_name_or_a_field(pope_dir: Path) -> None:
    samples, _ = load_pope(pope_dir / "coco_pope_adversarial.json", pope_dir / "img")
    assert {s.source for s in samples} == {"coco"} and {s.task for s in samples} == {"yesno"}
    rows = [dict(ROWS[0]), {**ROWS[1], "source": "GQA"}]
    (pope_dir / "aokvqa_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, _ = load_pope(pope_dir / "aokvqa_pope_random.json", pope_dir / "img")
    assert [s.source for s in samples] == ["aokvqa", "gqa"]
    (pope_dir / "my_pope_random.json").write_text(json.dumps(ROWS[0]) + "\n")
    samples, _ = load_pope(pope_dir / "my_pope_random.json", pope_dir / "img")
    assert samples[0].source is None
    shapes, _ = load_pope(pope_dir / "coco_pope_adversarial.json", pope_dir / "img", dataset="shapes-pope")
    assert shapes[0].source is None  # only POPE's own files name an image source


def _image_bytes(folder: Path, name: str) -> bytes:
    return (folder / name).read_bytes()


def test_lmms_eval_parquet_and_vlmevalkit_tsv_give_the_same_questions(pope_dir: Path) -> None:
    import base64

    import pyarrow as pa
    import pyarrow.parquet as pq

    reference, _ = load_pope(pope_dir / "coco_pope_adversarial.json", pope_dir / "img")
    img = pope_dir / "img"
    lmms = [
        {
            "question_id": str(r["question_id"]),
            "question": r["text"],
            "answer": r["label"],
            "image": {"bytes": _image_bytes(img, r["image"]), "path": None},
            "image_source": r["image"],
            "category": "adversarial",
        }
        for r in ROWS
    ]
    lmms.append({**lmms[0], "question_id": "9", "image": {"bytes": b"broken", "path": None}})
    pq.write_table(pa.Table.from_pylist(lmms), pope_dir / "pope_test.parquet")
    samples, errors = load_pope(pope_dir / "pope_test.parquet", pope_dir)
    assert [s.sample_id for s in samples] == [s.sample_id for s in reference]
    assert [(s.label, s.object, s.split) for s in samples] == [
        (s.label, s.object, s.split) for s in reference
    ]
    assert samples[0].image_bytes == _image_bytes(img, "a.png") and samples[0].image_path is None
    assert [e.question_id for e in errors] == ["9"] and "not a picture" in errors[0].error
    assert load_image(samples[2]).size == (8, 8)

    header = "index\timage\tquestion\tanswer\tcategory\n"
    lines = [
        f"{r['question_id']}\t{base64.b64encode(_image_bytes(img, r['image'])).decode()}\t{r['text']}\t"
        f"{r['label']}\tadversarial\n"
        for r in ROWS
    ]
    lines.append("10\tnot-base64!\tIs there a cat in the image?\tno\tadversarial\n")
    lines.append(
        f"11\t{base64.b64encode(_image_bytes(img, 'a.png')).decode()}\tIs there a dog?\tno\tcolour\n"
    )
    (pope_dir / "POPE.tsv").write_text(header + "".join(lines))
    tsv, tsv_errors = load_pope(pope_dir / "POPE.tsv", pope_dir)
    assert [(s.question_id, s.label, s.object, s.split) for s in tsv] == [
        (s.question_id, s.label, s.object, s.split) for s in reference
    ]
    why = {e.question_id: e.error for e in tsv_errors}
    assert "no readable image" in why["10"] and "names no POPE split" in why["11"]


def test_a_pope_run_with_every_row_rejected_exits_non_zero(pope_dir: Path, tmp_path: Path) -> None:
    (pope_dir / "POPE.tsv").write_text(
        "index\timage\tquestion\tanswer\tcategory\n1\t\tIs there a cat?\tyes\trandom\n"
    )
    toy = Path(__file__).resolve().parents[2] / "vrp" / "toys" / "toy-llava"
    args = [
        "ingest",
        "run",
        "--model",
        str(toy),
        "--dataset",
        "pope",
        "--pope-file",
        str(pope_dir / "POPE.tsv"),
    ]
    for extra in ([], ["--strict"]):
        result = CliRunner().invoke(main, [*args, *extra, "--lake", str(tmp_path / "lake")])
        assert result.exit_code != 0, result.output
        assert "no question could be read: all 1 rows were rejected" in result.output
        assert len(result.output.strip().splitlines()) == 1
