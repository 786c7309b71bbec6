"""Interventions on tiny models: exact patch masks per family, exact MLP edits, idempotent runs, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from lake_util import probe_neuron_rows
from PIL import Image

from vrp.cli import main
from vrp.ingest.datasets import generate_shapes_pope
from vrp.ingest.models import load_adapter
from vrp.ingest.models.registry import families
from vrp.ingest.models.tiny import build_tiny
from vrp.ingest.run import IngestOptions, run_ingest
from vrp.interventions import ablate, hooks, mask, scoring
from vrp.interventions import base as ivbase
from vrp.interventions import destroy as destroy_kind
from vrp.lake import open_lake

FAMILIES = tuple(fam.name for fam in families())  # every registered family
N_QUESTIONS = 8
HIDDEN = 64
QUIET = {"echo": lambda _line: None}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three tiny models, one shapes-POPE folder and a lake holding one base run per model."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("interventions")
    data = generate_shapes_pope(root / "shapes", images=4, seed=11)
    lake_dir = str(root / "lake")
    models, runs = {}, {}
    for family in FAMILIES:
        models[family] = build_tiny(family, root / f"tiny-{family}", seed=0, num_layers=2, hidden_size=HIDDEN)
        options = IngestOptions(
            model=str(models[family]),
            data_dir=str(data),
            limit=N_QUESTIONS,
            batch_size=4,
            self_consistency=0,
        )
        runs[family] = run_ingest(options, lake_dir, **QUIET).run_id
    adapters = {family: load_adapter(str(path)) for family, path in models.items()}
    return {
        "root": root,
        "data": data,
        "lake": lake_dir,
        "models": models,
        "runs": runs,
        "adapters": adapters,
    }


def _stored_maps(lake_dir: str, run_id: str, layer: int) -> dict[str, np.ndarray]:
    rows = (
        open_lake(lake_dir)
        .sql(
            f"select sample_id, map from attention_maps where run_id = '{run_id}' and layer = {layer} "
            "and coalesce(tile, -1) = -1"
        )
        .fetchall()
    )
    return {sid: np.asarray(m, dtype=np.float64) for sid, m in rows}


def _grid_mass(lake_dir: str, run_id: str, sample_id: str) -> float:
    """The last layer's attention mass on every grid's cells (the stitched row's mass)."""
    key = {"run_id": run_id, "sample_id": sample_id, "layer": 1, "tile": -1}
    return open_lake(lake_dir).arrow("attention_maps", filter=key, columns=["mass"]).column("mass")[0].as_py()


def _random_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """An image at the preprocessed size (every processor leaves it unresized), with no pixel at 128."""
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[pixels == mask.GREY] = mask.GREY - 1
    return Image.fromarray(pixels)


def _grey_boxes(image: Image.Image, boxes: list[tuple[int, int, int, int]]) -> Image.Image:
    pixels = np.asarray(image).copy()
    for x0, y0, x1, y1 in boxes:
        pixels[y0:y1, x0:x1] = mask.GREY
    return Image.fromarray(pixels)


@pytest.mark.parametrize("family", FAMILIES)
def test_high_mask_greys_exactly_the_top_attended_patches(world, family) -> None:
    adapter = world["adapters"][family]
    run_id = world["runs"][family]
    plan = mask.plan_mask(open_lake(world["lake"]), run_id, ratio=0.3, layer=-1, seed=1)
    assert plan.layer == 1 and plan.setting == "ratio=0.3,layer=1,seed=1"

    # the chosen cells are the 30% most attended cells of the stored last-layer map
    maps = _stored_maps(world["lake"], run_id, 1)
    sample_id, attention = sorted(maps.items())[0]
    shapes, ranked = plan.maps[sample_id]
    if len(shapes) > 1:  # several grids: the cells of every grid ranked together by their share
        assert ranked.sum() == pytest.approx(_grid_mass(world["lake"], run_id, sample_id), rel=1e-5)
        pytest.skip("several grids per image: the family's own module checks the pixels through its tiling")
    assert shapes == ((4, 4),)  # one grid
    high = mask.rank_cells(ranked, "high", ivbase.n_cells(0.3, attention.size))
    assert len(high) == 5  # 0.3 * 16 = 4.8 -> 5
    others = np.setdiff1d(np.arange(attention.size), high)
    assert attention[high].min() >= attention[others].max()
    low = mask.rank_cells(attention, "low", 5)
    assert attention[low].max() <= attention[np.setdiff1d(np.arange(16), low)].min()

    # masking the preprocessed pixels == greying those boxes in an image the processor leaves unresized
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (32, 24)] if family == "qwen2vl" else [(32, 32), (32, 32)]  # Qwen: ragged batch
    images = [_random_image(rng, h, w) for h, w in sizes]
    questions = ["Is there a red circle in the image?", "Is there a blue star?"]
    enc = adapter.encode(images, questions)
    cells = [high, [0, enc.grids[1][0] * enc.grids[1][1] - 1]]
    masked = mask.mask_cells(adapter, enc, cells)
    greyed = [
        _grey_boxes(image, [adapter.patch_box(enc, row, cell) for cell in cells[row]])
        for row, image in enumerate(images)
    ]
    reference = adapter.encode(greyed, questions).inputs["pixel_values"]
    original = enc.inputs["pixel_values"]
    assert torch.equal(masked != original, reference != original), (
        "changed exactly the chosen patches' pixels"
    )
    torch.testing.assert_close(masked, reference, rtol=0, atol=1e-6)
    assert int((masked != original).sum()) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_patches_reproduce_the_baseline_answers(world, family) -> None:
    run_id = world["runs"][family]
    lake = open_lake(world["lake"])
    # 0.001 of the cells rounds to none on every tiny family (fewer than 500 cells over all grids)
    plan = mask.plan_mask(lake, run_id, ratio=0.001, seed=3)
    summary = ivbase.run_intervention(plan, world["lake"], adapter=world["adapters"][family], **QUIET)
    assert summary.written == N_QUESTIONS
    lake = open_lake(world["lake"])
    rows = lake.sql(
        "select i.condition, i.detail, i.answer_text, s.answer_text, i.p_yes, s.p_yes, i.correct, s.correct "
        f"from interventions i join samples s on s.run_id = '{run_id}' and s.sample_id = i.sample_id "
        f"where i.run_id = '{plan.run_id}'"
    ).fetchall()
    assert len(rows) == 4 * N_QUESTIONS
    for condition, detail, text, base_text, p_yes, base_p_yes, correct, base_correct in rows:
        assert json.loads(detail)["patches"] == []
        assert text == base_text and correct == base_correct, condition
        assert p_yes == pytest.approx(base_p_yes, rel=1e-4, abs=1e-6)
    run = lake.sql(f"select base_run_id, kind, status from runs where run_id = '{plan.run_id}'").fetchall()
    assert run == [(run_id, "mask", "complete")]


def test_mask_rerun_writes_nothing_and_a_new_seed_draws_new_random_patches(world) -> None:
    lake_dir = world["lake"]
    adapter = world["adapters"]["llava"]
    base = world["runs"]["llava"]
    first = mask.plan_mask(open_lake(lake_dir), base, ratio=0.3, seed=1)
    ivbase.run_intervention(first, lake_dir, adapter=adapter, **QUIET)
    versions = open_lake(lake_dir).versions()
    again = ivbase.run_intervention(
        mask.plan_mask(open_lake(lake_dir), base, ratio=0.3, seed=1), lake_dir, **QUIET
    )
    assert again.written == 0 and again.skipped_done == N_QUESTIONS
    assert open_lake(lake_dir).versions() == versions, "a rerun must not commit anything"

    second = mask.plan_mask(open_lake(lake_dir), base, ratio=0.3, seed=2)
    assert second.run_id != first.run_id
    ivbase.run_intervention(second, lake_dir, adapter=adapter, **QUIET)
    lake = open_lake(lake_dir)

    def patches(run_id: str, condition: str) -> dict[str, list[int]]:
        rows = lake.sql(
            "select sample_id, detail from interventions "
            f"where run_id = '{run_id}' and condition = '{condition}'"
        ).fetchall()
        return {sid: json.loads(detail)["patches"] for sid, detail in rows}

    assert patches(first.run_id, "high") == patches(second.run_id, "high")
    random_1, random_2 = patches(first.run_id, "random"), patches(second.run_id, "random")
    assert random_1 != random_2 and all(len(p) == 5 for p in random_1.values())
    seeds = lake.sql(
        f"select distinct seed from interventions where run_id = '{second.run_id}' and condition = 'random'"
    )
    assert seeds.fetchall() == [(2,)]


def _trace(module: torch.nn.Module, store: list[torch.Tensor]) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda _m, _i, out: store.append(out.detach().clone()))


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_hook_zeroes_exactly_the_listed_coordinates_and_removal_restores_logits(world, family) -> None:
    adapter = world["adapters"][family]
    image = _random_image(np.random.default_rng(1), 32, 32)
    enc = adapter.encode([image, image], ["Is there a red circle?", "Is there a blue square in the image?"])
    module = adapter.mlp(0)
    coords = [1, 17, 40]
    with torch.no_grad():
        clean: list[torch.Tensor] = []
        handle = _trace(module, clean)
        base_logits = adapter.model(**enc.inputs).logits
        handle.remove()
        edited: list[torch.Tensor] = []
        with hooks.EditOutput(module, coords):
            handle = _trace(module, edited)  # registered after the edit: sees the edited output
            edited_logits = adapter.model(**enc.inputs).logits
            handle.remove()
        after_logits = adapter.model(**enc.inputs).logits
    keep = np.setdiff1d(np.arange(HIDDEN), coords)
    assert clean[0][:, -1, coords].abs().min() > 0  # non-zero before (padding positions are zero anyway)
    assert torch.count_nonzero(edited[0][..., coords]) == 0  # every position, every row
    assert torch.equal(edited[0][..., keep], clean[0][..., keep])  # nothing else touched
    assert not torch.equal(edited_logits, base_logits)
    assert torch.equal(after_logits, base_logits), "removing the hook restores the logits bit for bit"
    assert not module._forward_hooks

    # decoding steps are edited too, and mean mode writes the given values at every position
    values = [0.5, -1.25, 2.0]
    calls: list[torch.Tensor] = []
    with hooks.EditOutput(module, coords, values):
        handle = _trace(module, calls)
        scoring.answer_batch(adapter, enc.inputs, ["yes", "no"], max_new_tokens=3)
        handle.remove()
    assert len(calls) >= 2 and calls[1].shape[1] == 1  # prefill, then one token per step
    for out in calls:
        assert torch.equal(out[..., coords], torch.tensor(values).expand_as(out[..., coords]))
    with pytest.raises(RuntimeError, match="boom"), hooks.EditOutput(module, coords):
        raise RuntimeError("boom")
    assert not module._forward_hooks, "the hook removes itself on error"


def _write_probes(lake_dir: str, run_id: str, model: str, layer: int) -> tuple[list[int], list[int]]:
    """probe_neurons rows (l1: 8 ranked neurons, l2: all) as `vrp analyze probes` writes them."""
    rows, l1, l2 = probe_neuron_rows(run_id, model, layer, HIDDEN)
    lake = open_lake(lake_dir)
    lake.write_table("probe_neurons", rows)
    lake.write_table(
        "probe_layers",
        [
            {"run_id": run_id, "model": model, "site": "resid", "layer": i, "probe": "logreg", "auroc": a}
            for i, a in ((0, 0.7), (1, 0.9))
        ],
    )
    return l1, l2


def test_ablate_and_destroy_runs(world) -> None:
    lake_dir = str(world["root"] / "lake-neurons")
    family = "paligemma"
    options = IngestOptions(
        model=str(world["models"][family]),
        data_dir=str(world["data"]),
        limit=6,
        batch_size=6,
        self_consistency=0,
    )
    base = run_ingest(options, lake_dir, **QUIET).run_id
    adapter = world["adapters"][family]
    l1, l2 = _write_probes(lake_dir, base, adapter.name, 1)

    plan = ablate.plan_ablate(open_lake(lake_dir), base, layer=-1, top_k=3, mode="mean", seed=0)
    ivbase.run_intervention(plan, lake_dir, adapter=adapter, **QUIET)
    lake = open_lake(lake_dir)
    rows = lake.sql(
        f"select condition, level, detail, seed from interventions where run_id = '{plan.run_id}'"
    ).fetchall()
    assert sorted({(c, lv) for c, lv, _d, _s in rows}) == [("full", 0.0), ("probe", 3.0), ("random", 3.0)]
    details = {c: json.loads(d) for c, _lv, d, _s in rows}
    assert details["probe"]["neurons"] == sorted(l1[:3])
    assert not set(details["random"]["neurons"]) & set(l1[:3]) and len(details["random"]["neurons"]) == 3
    hidden = np.array(
        [
            h
            for (h,) in lake.sql(
                f"select h from hidden where run_id = '{base}' and site = 'mlp_out' and layer = 1"
            ).fetchall()
        ],
        dtype=np.float64,
    )
    assert details["probe"]["values"] == pytest.approx(hidden[:, sorted(l1[:3])].mean(axis=0).tolist())
    assert {s for c, _lv, _d, s in rows if c == "random"} == {0}

    other = ablate.plan_ablate(open_lake(lake_dir), base, layer=1, top_k=3, mode="mean", seed=5)
    assert other.run_id != plan.run_id
    assert other.edits[1].coords == plan.edits[1].coords and other.edits[2].coords != plan.edits[2].coords

    destroy = destroy_kind.plan_destroy(
        open_lake(lake_dir), base, layer="peak", fractions=[0.25, 0.5], order="probe"
    )
    assert (
        destroy.layer == 1 and destroy.setting == "layer=1,order=probe,seed=0"
    )  # layer 1 has the best AUROC
    ivbase.run_intervention(destroy, lake_dir, adapter=adapter, **QUIET)
    lake = open_lake(lake_dir)
    got = lake.sql(
        "select condition, level, count(*), min(detail) from interventions "
        f"where run_id = '{destroy.run_id}' "
        "group by all order by level"
    ).fetchall()
    assert [(c, lv, n, json.loads(d)["n"]) for c, lv, n, d in got] == [
        ("full", 0.0, 6, 0),
        ("probe", 0.25, 6, 16),
        ("probe", 0.5, 6, 32),
    ]
    assert [e.coords for e in destroy.edits[1:]] == [tuple(sorted(l2[:16])), tuple(sorted(l2[:32]))]
    with pytest.raises(ivbase.InterventionError, match="no l2 probe neurons for layer 0"):
        # layer 0's neurons were never ranked: the L2 order is read per layer
        destroy_kind.plan_destroy(open_lake(lake_dir), base, layer=0, order="probe")


def test_missing_prerequisites_fail_before_any_model_is_loaded(world, tmp_path, refused_intervention) -> None:
    """Every command gets a model path that does not exist: the error must be the prerequisite's."""
    run = world["runs"]["llava"]
    nowhere = str(tmp_path / "no-model")
    runner = CliRunner()

    def fails(*args: str) -> str:
        return refused_intervention(world["lake"], *args)

    assert "no run 'missing'" in fails("mask", "--base-run", "missing")
    assert "out of range" in fails("mask", "--base-run", run, "--layer", "7")
    assert "out of range" in fails("ablate", "--base-run", run, "--layer", "-3")
    assert "strictly between 0 and 1" in fails("mask", "--base-run", run, "--ratio", "1.5")
    assert "strictly between 0 and 1" in fails("mask", "--base-run", run, "--ratio", "0")
    assert "vrp analyze probes" in fails("ablate", "--base-run", run, "--layer", "1")
    assert "vrp analyze probes" in fails("destroy", "--base-run", run, "--layer", "peak")
    assert "vrp analyze probes" in fails("destroy", "--base-run", run, "--layer", "0", "--order", "probe")
    assert "unknown mask conditions" in fails("mask", "--base-run", run, "--conditions", "full,top")

    # a base run that stored only layer 0's maps cannot rank by the last layer
    options = IngestOptions(
        model=str(world["models"]["llava"]),
        data_dir=str(world["data"]),
        limit=2,
        layers=(0,),
        self_consistency=0,
    )
    partial = run_ingest(options, str(tmp_path / "lake-partial"), **QUIET).run_id
    result = runner.invoke(
        main,
        [
            "ingest",
            "intervene",
            "mask",
            "--base-run",
            partial,
            "--model",
            nowhere,
            "--lake",
            str(tmp_path / "lake-partial"),
        ],
    )
    assert result.exit_code != 0 and "did not store the attention maps of layer 1" in result.output


def test_cli_mask_runs_end_to_end(world) -> None:
    run = world["runs"]["qwen2vl"]
    args = ["ingest", "intervene", "mask", "--base-run", run, "--ratio", "0.5", "--conditions", "full,high"]
    result = CliRunner().invoke(main, [*args, "--lake", world["lake"]])
    assert result.exit_code == 0, result.output
    assert f"{N_QUESTIONS} new samples" in result.output and "high    level 0.5" in result.output
    lake = open_lake(world["lake"])
    n = lake.sql(
        "select count(*) from interventions i join runs r using (run_id) "
        f"where r.base_run_id = '{run}' and r.kind = 'mask' and i.setting = 'ratio=0.5,layer=1,seed=0'"
    ).fetchall()[0][0]
    assert n == 2 * N_QUESTIONS
    again = CliRunner().invoke(main, [*args, "--lake", world["lake"]])
    assert "0 new samples" in again.output
