"""Evidence maps and stored images against the model's own logits and the processor's own pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_util import local_patches
from PIL import Image

from vrp.ingest.capture import capture_batch
from vrp.ingest.datasets import generate_shapes_pope
from vrp.ingest.models import load_adapter
from vrp.ingest.models.registry import families
from vrp.ingest.models.tiny import build_tiny
from vrp.ingest.run import IngestOptions, run_ingest
from vrp.lake import open_lake
from vrp.lake.images import decode, image_hash
from vrp.metrics.grids import stitch_evidence
from vrp.tasks import get_task
from vrp.tasks.base import Label
from vrp.tasks.yesno import yes_no_ids

FAMILIES = tuple(fam.name for fam in families())  # every registered family
QUESTIONS = ["Is there a red circle in the image?", "Is there a square?"]
LABELS = ["yes", "no"]


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request, tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    path = build_tiny(request.param, tmp_path_factory.mktemp(request.param), seed=0, num_layers=3)
    return load_adapter(str(path))


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    # two sizes, so Qwen2-VL's rows get different grids and the batch is left padded
    return [Image.fromarray(rng.integers(0, 255, (32, 24 + 8 * i, 3), dtype=np.uint8)) for i in range(2)]


def _per_cell(cap, enc, b: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(the evidence of every grid cell in tile order, those cells' indices among the image tokens).

    One grid: the stored map itself. Several (4.1b): the per-grid maps, and the stored map must be
    their stitch.
    """
    layout = enc.layouts[b]
    cells = np.concatenate([g.positions for g in layout.grids])
    if not layout.multi:
        return cap.evidence[b][layer], cells
    per_cell = np.concatenate(cap.grid_evidence[b][layer])
    tokens = np.zeros(layout.n_tokens)
    tokens[cells] = per_cell
    np.testing.assert_allclose(cap.evidence[b][layer], stitch_evidence(tokens, layout), atol=1e-6)
    return per_cell, cells


def test_last_layer_evidence_equals_the_models_own_logits(adapter) -> None:
    """At the last layer, evidence at image position p == final logits at p: truth minus their mean."""
    enc = adapter.encode(_images(), QUESTIONS)
    layers = list(range(adapter.num_layers))
    cap = capture_batch(adapter, enc, LABELS, max_new_tokens=1, evidence_layers=layers)
    with torch.no_grad():
        logits = adapter.model(**enc.inputs).logits.float()  # a fresh forward, every position
    for b, label in enumerate(LABELS):
        yes, no = yes_no_ids(adapter)
        variants = yes if label == "yes" else no
        at_answer = logits[b, int(enc.answer_pos[b])]
        truth = variants[int(at_answer[variants].argmax())]  # the label's variant the model scores highest
        got, cells = _per_cell(cap, enc, b, adapter.num_layers - 1)
        at_image = logits[b, enc.image_pos[b][cells]]  # [cells, V]
        expected = (at_image[:, truth] - at_image.mean(-1)).numpy()
        assert cap.evidence[b][adapter.num_layers - 1].shape == (enc.grids[b][0] * enc.grids[b][1],)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        assert np.ptp(got) > 1e-3, "the map must vary over the image for the test to mean anything"
        # earlier layers are the logit lens, not the last layer repeated
        assert not np.allclose(_per_cell(cap, enc, b, 0)[0], got, atol=1e-3)


def test_open_answers_use_the_tasks_teacher_forced_truth_token(adapter) -> None:
    """For an open answer the map follows the task's truth token: the gold answer's first token."""
    images = _images()
    enc = adapter.encode(images, QUESTIONS)
    golds = [Label("red", ("red",) * 10), Label(None, None)]  # the second has no gold answer
    task = get_task("open")
    layers = list(range(adapter.num_layers))
    cap = capture_batch(
        adapter,
        enc,
        golds,
        task=task,
        images=images,
        questions=QUESTIONS,
        max_new_tokens=1,
        evidence_layers=layers,
    )
    truth = adapter.answer_ids(images[0], QUESTIONS[0], "red")[0]  # teacher-forced, independently
    with torch.no_grad():
        logits = adapter.model(**enc.inputs).logits.float()
    got, cells = _per_cell(cap, enc, 0, adapter.num_layers - 1)
    at_image = logits[0, enc.image_pos[0][cells]]
    expected = (at_image[:, truth] - at_image.mean(-1)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert cap.evidence[1] == {}, "no gold answer, no truth token, no map"
    assert cap.nonfinite == [None, None]


def test_evidence_maps_are_optional(adapter) -> None:
    enc = adapter.encode(_images()[:1], QUESTIONS[:1])
    cap = capture_batch(adapter, enc, LABELS[:1], max_new_tokens=1)
    assert cap.evidence == []


def test_one_bright_patch_lights_its_own_cell(adapter) -> None:
    """A bright cell at (row 1, col 2) changes the evidence most at that cell: no transpose, no shift."""
    base = np.full((32, 32, 3), 20, dtype=np.uint8)
    enc = adapter.encode([Image.fromarray(base)], QUESTIONS[:1])
    if enc.layouts[0].multi:
        pytest.skip("several grids per image: each family's own module lights a cell in every grid")
    grid_h, grid_w = enc.grids[0]
    cell = 1 * grid_w + 2
    x0, y0, x1, y1 = adapter.pixel_box_to_original(enc, 0, adapter.patch_box(enc, 0, cell))
    bright = base.copy()
    bright[y0:y1, x0:x1] = 255
    maps = []
    with local_patches(adapter):
        for picture in (base, bright):
            enc = adapter.encode([Image.fromarray(picture)], QUESTIONS[:1])
            cap = capture_batch(adapter, enc, LABELS[:1], max_new_tokens=1, evidence_layers=[0])
            maps.append(cap.evidence[0][0])
    change = np.abs(maps[1] - maps[0])
    assert int(np.argmax(change)) == cell, change.reshape(grid_h, grid_w)
    others = np.delete(change, cell)
    assert others.max() < 1e-4 < change[cell], "only the bright cell's evidence may change"
    assert cell != 2 * grid_w + 1  # a transposed grid would light another cell


def test_model_view_is_the_processors_picture(adapter) -> None:
    """The stored view, normalised the processor's way, is exactly what the model was given."""
    images = _images()
    enc = adapter.encode(images, QUESTIONS)
    views = adapter.model_views(images)
    ip = adapter.processor.image_processor
    mean = np.asarray(ip.image_mean, dtype=np.float32)
    std = np.asarray(ip.image_std, dtype=np.float32)
    pixel_values = enc.inputs["pixel_values"].numpy()
    if any(layout.multi for layout in enc.layouts):  # the stitched maps lie on the original image
        for image, view in zip(images, views, strict=True):
            assert np.array_equal(view, np.asarray(image.convert("RGB")))
        return
    offset = 0
    for b, view in enumerate(views):
        grid_h, grid_w = enc.grids[b]
        cell_h, cell_w = enc.cell_sizes[b]
        assert view.shape == (grid_h * cell_h, grid_w * cell_w, 3)
        normalised = ((view.astype(np.float32) * ip.rescale_factor - mean) / std).transpose(2, 0, 1)
        if adapter.spec.dynamic_resolution:  # Qwen2-VL: the processor's own patch flattening
            flat, _, _ = ip.patchify(
                normalised,
                patch_size=ip.patch_size,
                merge_size=ip.merge_size,
                temporal_patch_size=ip.temporal_patch_size,
            )
            given = pixel_values[offset : offset + flat.shape[0]]
            offset += flat.shape[0]
            np.testing.assert_allclose(flat, given, atol=1e-5, rtol=0)
        else:
            np.testing.assert_allclose(normalised, pixel_values[b], atol=1e-5, rtol=0)


def test_ingest_stores_each_picture_once_and_samples_point_at_it(tmp_path) -> None:
    torch.set_num_threads(1)
    data = generate_shapes_pope(tmp_path / "shapes", images=3, seed=5)
    model = build_tiny("llava", tmp_path / "tiny", seed=0, num_layers=2)
    lake_dir = str(tmp_path / "lake")
    options = IngestOptions(
        model=str(model), data_dir=str(data), limit=12, batch_size=4, self_consistency=0, commit_samples=4
    )
    run_ingest(options, lake_dir, echo=lambda _line: None)
    lake = open_lake(lake_dir)
    images = lake.arrow("images")
    hashes = lake.sql("select distinct image_hash from samples").fetchall()
    assert images.num_rows == len(hashes) == len(set(images.column("image_hash").to_pylist()))
    adapter = load_adapter(str(model))
    rows = lake.sql("select image_id, image_hash from samples").fetchall()
    stored = dict(
        zip(images.column("image_hash").to_pylist(), images.column("data").to_pylist(), strict=True)
    )
    for image_id, stored_hash in rows:
        original = Image.open(data / "images" / image_id).convert("RGB")
        view = adapter.model_views([original])[0]
        np.testing.assert_array_equal(decode(stored[stored_hash]), view)  # lossless
        assert image_hash(view) == stored_hash
    n_layers = 2
    assert lake.sql("select count(*) from evidence_maps").fetchall()[0][0] == len(rows) * n_layers
    # a rerun adds no image and no evidence
    run_ingest(options, lake_dir, echo=lambda _line: None)
    lake.refresh()
    assert lake.arrow("images").num_rows == images.num_rows
    assert lake.sql("select count(*) from evidence_maps").fetchall()[0][0] == len(rows) * n_layers


def test_no_evidence_skips_the_table(tmp_path) -> None:
    torch.set_num_threads(1)
    data = generate_shapes_pope(tmp_path / "shapes", images=2, seed=5)
    model = build_tiny("paligemma", tmp_path / "tiny", seed=0, num_layers=2)
    lake_dir = str(tmp_path / "lake")
    options = IngestOptions(
        model=str(model), data_dir=str(data), limit=4, batch_size=4, self_consistency=0, evidence=False
    )
    run_ingest(options, lake_dir, echo=lambda _line: None)
    lake = open_lake(lake_dir)
    assert lake.sql("select count(*) from samples").fetchall()[0][0] == 4
    assert lake.sql("select count(*) from evidence_maps").fetchall()[0][0] == 0


def test_a_batch_decodes_and_views_each_picture_once(tmp_path, monkeypatch) -> None:
    """Questions about one picture share one decode, one model view and one PNG; the rows stay exact."""
    import vrp.ingest.datasets as datasets
    from vrp.ingest.datasets import Sample
    from vrp.ingest.run import _batch_loader, _picture_rows

    rng = np.random.default_rng(1)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"p{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(paths[-1])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a picture")

    def sample(i: int, path) -> Sample:
        return Sample(f"s{i}", "pope", "random", str(i), path.name, "Is a cat?", "cat", "yes", str(path))

    decoded: list[str] = []
    real_load = datasets.load_image
    monkeypatch.setattr(datasets, "load_image", lambda s: decoded.append(s.image_path) or real_load(s))
    load = _batch_loader()
    batch = [sample(0, paths[0]), sample(1, paths[0]), sample(2, paths[1]), sample(3, paths[0])]
    images = [load(s) for s in batch]
    assert decoded == [str(paths[0]), str(paths[1])]
    assert images[0] is images[1] is images[3] and images[2] is not images[0]
    for _ in range(2):  # an unreadable picture fails for every question about it, not only the first
        with pytest.raises(datasets.SampleLoadError):
            load(sample(4, broken))

    model = build_tiny("llava", tmp_path / "tiny", seed=0, num_layers=2)
    adapter = load_adapter(str(model))
    shown: list[int] = []
    real_views = adapter.model_views
    monkeypatch.setattr(adapter, "model_views", lambda pics: shown.append(len(pics)) or real_views(pics))
    twin = Image.open(paths[0]).convert("RGB")  # another object with picture 0's pixels
    rows = _picture_rows(adapter, [*images, twin])
    assert shown == [3]  # picture 0, picture 1 and the twin; never a question's repeat
    assert rows[0] is rows[1] is rows[3] is rows[4]  # the twin shares the encoding by its hash
    for image, row in zip([*images, twin], rows, strict=True):
        view = real_views([image])[0]  # one picture at a time, as before this change
        assert row["image_hash"] == image_hash(view)
        np.testing.assert_array_equal(decode(row["data"]), view)
