"""Activation patching and attention knockout on tiny models of every family, checked independently."""

from __future__ import annotations

import contextvars
import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from vrp.cli import main
from vrp.ingest.capture import route_attention
from vrp.ingest.datasets import generate_shapes_pope, load_dataset
from vrp.ingest.models import load_adapter
from vrp.ingest.models.tiny import build_tiny
from vrp.ingest.run import IngestOptions, run_ingest
from vrp.interventions import base as ivbase
from vrp.interventions import hooks, patch
from vrp.interventions.base import Condition, answer_conditions
from vrp.interventions.knockout import plan_knockout
from vrp.interventions.scoring import answer_batch
from vrp.lake import open_lake

# the study's three families and one family that sees an image as several grids (and its subclass)
FAMILIES = ("llava", "paligemma", "qwen2vl", "llava_next", "llava_onevision")
LAYERS = 3
QUIET = {"echo": lambda _line: None, "progress": False}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("patch")
    data = generate_shapes_pope(root / "shapes", images=4, seed=5)
    samples, _ = load_dataset("shapes-pope", data_dir=str(data), split="random")
    models = {
        f: build_tiny(f, root / f"tiny-{f}", seed=1, num_layers=LAYERS, hidden_size=64) for f in FAMILIES
    }
    adapters = {f: load_adapter(str(path)) for f, path in models.items()}
    return {"root": root, "data": data, "samples": samples, "models": models, "adapters": adapters}


def _patch_plan(pairs, *, site="resid", layers=(LAYERS - 1,), positions="answer") -> patch.Patch:
    """A patch plan built directly (no lake): what `plan_patch` returns, for hook-level checks."""
    return patch.Patch(
        base={"run_id": "base", "config": {}},
        setting="test",
        seed=0,
        params={},
        site=site,
        layers=tuple(layers),
        positions=positions,
        pairs=tuple(pairs),
    )


def _labels(batch):
    return {s.sample_id: s.label for s in batch}


def _answer_logits(adapter, batch) -> torch.Tensor:
    """First-token logits of each sample answered alone (an independent forward per sample)."""
    from vrp.ingest.datasets import load_image

    out = []
    with torch.no_grad():
        for sample in batch:
            enc = adapter.encode([load_image(sample)], [sample.question])
            out.append(adapter.model(**enc.inputs).logits[0, int(enc.answer_pos[0])].float())
    return torch.stack(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_residual_patch_at_the_answer_gives_the_donors_distribution(world, family) -> None:
    from vrp.ingest.datasets import load_image

    adapter, samples = world["adapters"][family], world["samples"]
    recipients, donors = samples[:2], [samples[3], samples[5]]
    plan = _patch_plan([(r.sample_id, d.sample_id) for r, d in zip(recipients, donors, strict=True)])
    batch = plan.select(samples)
    enc = adapter.encode([load_image(s) for s in batch], [s.question for s in batch])
    state = plan.prepare(adapter, enc, batch)
    rows = torch.arange(len(batch))
    with torch.no_grad():
        clean = adapter.model(**enc.inputs).logits[rows, enc.answer_pos].float()
        with plan.apply(adapter, enc, Condition("patch", LAYERS - 1, LAYERS - 1), state):
            patched = adapter.model(**enc.inputs).logits[rows, enc.answer_pos].float()
    expected = _answer_logits(adapter, donors)
    assert not torch.allclose(clean, expected, atol=1e-3), "the donors must answer differently"
    torch.testing.assert_close(
        torch.log_softmax(patched, -1), torch.log_softmax(expected, -1), rtol=0, atol=1e-5
    )

    # the same through generate (the run's path): a donor with the recipient's label brings the
    # recipient's truth margin to the donor's own, so the restoration is 1
    by_label = {label: [s for s in samples if s.label == label] for label in ("yes", "no")}
    same = [(r.sample_id, by_label[r.label][-1].sample_id) for r in samples[:4]]
    plan = _patch_plan(same)
    batch = plan.select(samples)
    rows = answer_conditions(plan, adapter, batch, _labels(batch))
    patched_rows = [r for r in rows if r["condition"] == "patch"]
    assert len(patched_rows) == 4
    for row in patched_rows:
        assert row["restoration"] == pytest.approx(1.0, abs=1e-4), row["sample_id"]


@pytest.mark.parametrize("family", FAMILIES)
def test_self_patch_changes_nothing_bit_for_bit(world, family) -> None:
    adapter, samples = world["adapters"][family], world["samples"][:3]
    for site in patch.SITES:
        plan = _patch_plan(
            [(s.sample_id, s.sample_id) for s in samples], site=site, layers=range(LAYERS), positions="all"
        )
        batch = plan.select(world["samples"])
        rows = answer_conditions(plan, adapter, batch, _labels(batch))
        full = {r["sample_id"]: r for r in rows if r["condition"] == "full"}
        patched = [r for r in rows if r["condition"] == "patch"]
        assert len(patched) == LAYERS * len(samples)
        for row in patched:
            ref = full[row["sample_id"]]
            for key in ("answer_text", "p_yes", "p_no", "yes_no_margin", "token_entropy", "truth_margin"):
                assert row[key] == ref[key], (site, row["level"], key)
            assert row["restoration"] is None  # the donor's margin is the recipient's: no gap to close


def test_a_patch_at_one_layer_leaves_the_layers_below_unchanged(world) -> None:
    from vrp.ingest.datasets import load_image

    adapter, samples = world["adapters"]["llava"], world["samples"]
    plan = _patch_plan(
        [(samples[0].sample_id, samples[4].sample_id)], site="mlp_out", layers=(1,), positions="image"
    )
    batch = plan.select(samples)
    enc = adapter.encode([load_image(s) for s in batch], [s.question for s in batch])
    state = plan.prepare(adapter, enc, batch)
    prompt_len = int(enc.inputs["input_ids"].shape[1])
    layers = dict(enumerate(adapter.decoder_layers()))
    with torch.no_grad():
        with hooks.RecordOutputs(layers, prompt_len) as clean:
            adapter.model(**enc.inputs)
        with (
            plan.apply(adapter, enc, Condition("patch", 1.0, 1), state),
            hooks.RecordOutputs(layers, prompt_len) as edited,
        ):
            adapter.model(**enc.inputs)
    assert torch.equal(edited.values[0], clean.values[0]), "layer 0 is below the patch"
    for layer in (1, 2):
        assert not torch.equal(edited.values[layer], clean.values[layer])


def test_rows_of_one_batch_get_their_own_donors_vectors(world) -> None:
    from vrp.ingest.datasets import load_image

    adapter, samples = world["adapters"]["paligemma"], world["samples"]
    donors = [samples[2], samples[6]]
    plan = _patch_plan(
        [(samples[0].sample_id, donors[0].sample_id), (samples[1].sample_id, donors[1].sample_id)],
        site="attn_out",
        layers=(1,),
        positions="image",
    )
    batch = plan.select(samples)
    enc = adapter.encode([load_image(s) for s in batch], [s.question for s in batch])
    state = plan.prepare(adapter, enc, batch)
    module = adapter.attn(1)
    prompt_len = int(enc.inputs["input_ids"].shape[1])
    seen: list[torch.Tensor] = []
    with torch.no_grad(), plan.apply(adapter, enc, Condition("patch", 1.0, 1), state):
        handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out[0].detach().clone()))
        adapter.model(**enc.inputs)
        handle.remove()
    assert seen[0].shape[1] == prompt_len
    for row, donor in enumerate(donors):  # each donor run alone: an independent recording
        denc = adapter.encode([load_image(donor)], [donor.question])
        with torch.no_grad(), hooks.RecordOutputs({1: module}, int(denc.inputs["input_ids"].shape[1])) as rec:
            adapter.model(**denc.inputs)
        want = rec.values[1][0, denc.image_pos[0]]
        torch.testing.assert_close(seen[0][row, enc.image_pos[row]], want, rtol=0, atol=1e-5)
    other = seen[0][0, enc.image_pos[0]] - seen[0][1, enc.image_pos[1]]
    assert other.abs().max() > 1e-3, "the two rows received different vectors"


def test_pair_selection_is_seeded_and_prefers_the_same_image() -> None:
    def row(i, correct, image, obj="cat", label="yes", split="random"):
        return {
            "sample_id": f"s{i:02d}",
            "dataset": "d",
            "split": split,
            "image_id": image,
            "object": obj,
            "label": label,
            "correct": correct,
        }

    rows = [
        row(0, False, "a"),
        row(1, True, "a"),  # same image, same label: the only donor for s00
        row(2, True, "b"),
        row(3, True, "c"),
        row(4, False, "z", obj="dog"),  # no same image or object: any of s01..s03 (same label)
        row(5, False, "a", label="no"),  # no rightly answered "no": left without donor
        row(6, True, "a", split="popular"),  # another split never donates
        row(7, None, "a"),  # unparsed: neither recipient nor donor
    ]
    pairs, lonely = patch.counterfactual_pairs(rows, seed=3)
    assert pairs[0] == ("s00", "s01") and lonely == 1
    assert [r for r, _ in pairs] == ["s00", "s04"] and pairs[1][1] in {"s01", "s02", "s03"}
    assert patch.counterfactual_pairs(rows, seed=3) == (pairs, lonely)
    draws = {patch.counterfactual_pairs(rows, seed=s)[0][1][1] for s in range(20)}
    assert draws == {"s01", "s02", "s03"}, "the seed decides among equally good donors"
    rand, none = patch.random_pairs(rows, seed=9)
    assert rand == patch.random_pairs(rows, seed=9)[0] and none == 0
    assert [r for r, _ in rand] == ["s00", "s04", "s05"]
    assert {d for _, d in rand} <= {"s01", "s02", "s03", "s06"}
    kept, skipped = patch.skip_unequal_images([("a", "b"), ("a", "c")], {"a": 4, "b": 4, "c": 6})
    assert kept == [("a", "b")] and skipped == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_knockout_of_no_layer_reproduces_the_baseline_bit_for_bit(world, family) -> None:
    from vrp.ingest.datasets import load_image

    adapter, batch = world["adapters"][family], world["samples"][:3]
    enc = adapter.encode([load_image(s) for s in batch], [s.question for s in batch])
    labels = [s.label for s in batch]
    baseline = answer_batch(adapter, enc.inputs, labels, max_new_tokens=4)
    with hooks.knock_out_image_attention(adapter, enc, layers=(), source="text"):
        none = answer_batch(adapter, enc.inputs, labels, max_new_tokens=4)
    with hooks.knock_out_image_attention(adapter, enc, layers=range(LAYERS), source="text"):
        every = answer_batch(adapter, enc.inputs, labels, max_new_tokens=4)
    assert none == baseline
    assert [r["truth_margin"] for r in every] != [r["truth_margin"] for r in baseline]
    assert adapter.model.config._attn_implementation == "sdpa", "the routing is undone on exit"


_EAGER: contextvars.ContextVar = contextvars.ContextVar("test_eager", default=None)


def _eager_without_image(module, query, key, value, attention_mask, **kwargs):
    """Eager attention (explicit softmax) with text -> image entries removed, from input_ids alone."""
    state = _EAGER.get()
    if state is None or id(module) not in state["decoder"]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    ids, real = state["input_ids"], state["attention_mask"].bool()
    image = ids == state["image_token"]
    batch, n_query, n_key = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is None:
        allowed = torch.ones(n_query, n_key, dtype=torch.bool).tril(n_key - n_query)[None, None]
        allowed = allowed.expand(batch, 1, n_query, n_key).clone()
    else:
        allowed = attention_mask[..., :n_key].expand(batch, 1, n_query, n_key).clone()
    text_rows = (real & ~image) if n_query == ids.shape[1] else torch.ones(batch, n_query, dtype=torch.bool)
    image_keys = torch.zeros(batch, n_key, dtype=torch.bool)
    image_keys[:, : ids.shape[1]] = image[:, :n_key]
    allowed &= ~(text_rows[:, None, :, None] & image_keys[:, None, None, :])
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).float()
    v = value.repeat_interleave(groups, dim=1).float()
    scores = query.float() @ k.transpose(-1, -2) * kwargs.get("scaling", module.scaling)
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = (weights @ v).to(query.dtype).transpose(1, 2).contiguous()
    return out, weights


AttentionInterface.register("test_eager_knockout", _eager_without_image)
ALL_MASK_ATTENTION_FUNCTIONS.register("test_eager_knockout", sdpa_mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_knockout_of_every_layer_from_text_equals_eager_attention_without_those_entries(
    world, family
) -> None:
    from vrp.ingest.datasets import load_image

    adapter, batch = world["adapters"][family], world["samples"][:3]
    enc = adapter.encode([load_image(s) for s in batch], [s.question for s in batch])
    rows = torch.arange(len(batch))
    state = {
        "decoder": {id(adapter.attn(i)) for i in range(LAYERS)},
        "input_ids": enc.inputs["input_ids"],
        "attention_mask": enc.inputs["attention_mask"],
        "image_token": adapter.image_token_id,
    }
    with torch.no_grad():
        clean = adapter.model(**enc.inputs).logits[rows, enc.answer_pos]
        with hooks.knock_out_image_attention(adapter, enc, layers=range(LAYERS), source="text"):
            knocked = adapter.model(**enc.inputs).logits[rows, enc.answer_pos]
        with route_attention(adapter.model, "test_eager_knockout", _EAGER, state):
            eager = adapter.model(**enc.inputs).logits[rows, enc.answer_pos]
    assert (knocked - clean).abs().max() > 1e-3, "cutting the image off must change the answer"
    torch.testing.assert_close(knocked, eager, rtol=0, atol=1e-5)


# ----- runs on a lake ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lake_world(world):
    lake_dir = str(world["root"] / "lake")
    options = IngestOptions(
        model=str(world["models"]["llava"]),
        data_dir=str(world["data"]),
        limit=12,
        batch_size=6,
        self_consistency=0,
    )
    base = run_ingest(options, lake_dir, **QUIET).run_id
    return {"lake": lake_dir, "base": base}


def test_patch_and_knockout_runs_store_their_rows_and_reruns_add_nothing(world, lake_world) -> None:
    lake_dir, base = lake_world["lake"], lake_world["base"]
    adapter = world["adapters"]["llava"]
    plan = patch.plan_patch(open_lake(lake_dir), base, site="resid", layers="all", pairs="random", seed=2)
    assert plan.pairs == patch.plan_patch(open_lake(lake_dir), base, pairs="random", seed=2).pairs
    summary = ivbase.run_intervention(plan, lake_dir, adapter=adapter, batch_size=4, **QUIET)
    assert summary.written == len(plan.pairs) > 0
    rows = open_lake(lake_dir).arrow("interventions", filter={"run_id": plan.run_id}).to_pylist()
    assert len(rows) == (1 + LAYERS) * len(plan.pairs)
    donor_of = dict(plan.pairs)
    for row in rows:
        assert row["donor_sample_id"] == donor_of[row["sample_id"]]
        if row["condition"] == "patch":
            assert (
                row["setting"] == f"site=resid,layer={int(row['level'])},positions=answer,pairs=random,seed=2"
            )
    full = {r["sample_id"]: r for r in rows if r["condition"] == "full"}
    for row in rows:  # the restoration is recomputed from the stored margins
        if row["condition"] == "patch" and row["restoration"] is not None:
            donor_margin = json.loads(row["detail"])["donor_truth_margin"]
            gap = donor_margin - full[row["sample_id"]]["truth_margin"]
            assert row["restoration"] == pytest.approx(
                (row["truth_margin"] - full[row["sample_id"]]["truth_margin"]) / gap
            )

    knock = plan_knockout(open_lake(lake_dir), base, layers="0-1,2", source="answer")
    ivbase.run_intervention(knock, lake_dir, adapter=adapter, batch_size=6, **QUIET)
    got = (
        open_lake(lake_dir)
        .sql(
            "select condition, level, count(*) from interventions "
            "where kind = 'knockout' group by all order by all"
        )
        .fetchall()
    )
    assert got == [("0-1", 2.0, 12), ("2", 1.0, 12), ("full", 0.0, 12)]

    versions = open_lake(lake_dir).versions()
    for again in (plan, knock):
        assert ivbase.run_intervention(again, lake_dir, **QUIET).written == 0
    assert open_lake(lake_dir).versions() == versions, "a rerun commits nothing"


def test_image_position_pairs_with_different_grids_are_skipped_and_counted(world, tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"square.png": (56, 56), "wide.png": (28, 56)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    questions = [
        {"question_id": i, "image": image, "text": f"Is there a {obj} in the image?", "label": label}
        for i, (image, obj, label) in enumerate(
            [("square.png", "cat", "yes"), ("square.png", "dog", "no"), ("wide.png", "cat", "yes")]
        )
    ]
    pope_file = tmp_path / "pope_random.jsonl"
    pope_file.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    lake_dir = str(tmp_path / "lake")
    options = IngestOptions(
        model=str(world["models"]["qwen2vl"]),
        dataset="pope",
        pope_file=str(pope_file),
        image_dir=str(images),
        self_consistency=0,
    )
    base = run_ingest(options, lake_dir, **QUIET).run_id
    ids = {r["question_id"]: r["sample_id"] for r in open_lake(lake_dir).arrow("samples").to_pylist()}
    tokens = {r["sample_id"]: r["n_image_tokens"] for r in open_lake(lake_dir).arrow("samples").to_pylist()}
    assert tokens[ids["0"]] != tokens[ids["2"]]
    pairs_file = tmp_path / "pairs.csv"
    with open(pairs_file, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["recipient_sample_id", "donor_sample_id"])
        writer.writerows([[ids["0"], ids["1"]], [ids["2"], ids["0"]]])
    plan = patch.plan_patch(open_lake(lake_dir), base, positions="image", layers="-1", pairs=str(pairs_file))
    assert plan.pairs == ((ids["0"], ids["1"]),)
    summary = ivbase.run_intervention(plan, lake_dir, adapter=world["adapters"]["qwen2vl"], **QUIET)
    assert "  1 pairs skipped: donor and recipient have different image-token counts" in summary.lines()
    assert summary.written == 1


def test_missing_prerequisites_fail_before_any_model_is_loaded(
    lake_world, tmp_path, refused_intervention
) -> None:
    lake_dir, base = lake_world["lake"], lake_world["base"]
    bad_pairs = tmp_path / "pairs.csv"
    bad_pairs.write_text("recipient_sample_id,donor_sample_id\nnot-a-sample,other\n", encoding="utf-8")

    def fails(*args: str) -> str:
        return refused_intervention(lake_dir, *args)

    assert "no run 'missing'" in fails("patch", "--base-run", "missing")
    assert "out of range" in fails("patch", "--base-run", base, "--layers", "7")
    assert "bad layer spec" in fails("patch", "--base-run", base, "--layers", "a-b")
    assert "are not samples of run" in fails("patch", "--base-run", base, "--pairs", str(bad_pairs))
    assert "cannot read the pairs file" in fails(
        "patch", "--base-run", base, "--pairs", str(tmp_path / "none.csv")
    )
    assert "ends before it starts" in fails("knockout", "--base-run", base, "--layers", "2-1")
    assert "names a window twice" in fails("knockout", "--base-run", base, "--layers", "0-1,0-1")
    assert "out of range" in fails("knockout", "--base-run", base, "--layers", "0-5")


def test_named_queries_and_report_figures_of_patch_knockout_and_the_mask_detector(world, lake_world) -> None:
    from vrp.analysis.report import _causal_figures
    from vrp.interventions.mask import plan_mask
    from vrp.lake.query import named_query

    lake_dir, base = lake_world["lake"], lake_world["base"]
    adapter = world["adapters"]["llava"]
    for plan in (
        patch.plan_patch(open_lake(lake_dir), base, site="mlp_out", layers="0,2", pairs="random", seed=4),
        plan_knockout(open_lake(lake_dir), base, layers="0,1-2", source="text"),
        plan_mask(open_lake(lake_dir), base, ratio=0.5, seed=1),
    ):
        ivbase.run_intervention(plan, lake_dir, adapter=adapter, batch_size=6, **QUIET)
    lake = open_lake(lake_dir)
    rows = lake.arrow("interventions").to_pylist()

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values)

    restoration = lake.sql(named_query("patch_restoration")).to_arrow_table().to_pylist()
    for got in restoration:
        cell = [
            r
            for r in rows
            if r["kind"] == "patch"
            and r["condition"] == "patch"
            and int(r["level"]) == got["layer"]
            and f"site={got['site']}," in r["setting"]
            and f"pairs={got['pairs']}," in r["setting"]
        ]
        assert got["n"] == sum(r["restoration"] is not None for r in cell)
        assert got["mean_restoration"] == pytest.approx(mean(r["restoration"] for r in cell))
    assert {(r["site"], r["layer"]) for r in restoration if r["pairs"] == "random"} >= {
        ("mlp_out", 0),
        ("mlp_out", 2),
    }

    effects = lake.sql(named_query("knockout_effects")).to_arrow_table().to_pylist()
    text = {r["window"]: r for r in effects if r["source"] == "text"}
    assert sorted(text) == ["0", "1-2"] and text["1-2"]["first_layer"] == 1
    runs = {r["run_id"] for r in rows if r["kind"] == "knockout" and "from=text" in r["setting"]}
    full = {r["sample_id"]: r for r in rows if r["run_id"] in runs and r["condition"] == "full"}
    window = [r for r in rows if r["run_id"] in runs and r["condition"] == "1-2"]
    acc = mean(float(bool(r["correct"])) for r in window) - mean(
        float(bool(f["correct"])) for f in full.values()
    )
    assert text["1-2"]["delta_accuracy"] == pytest.approx(acc)
    assert text["1-2"]["delta_truth_margin"] == pytest.approx(
        mean(r["truth_margin"] - full[r["sample_id"]]["truth_margin"] for r in window)
    )

    detector = lake.sql(named_query("mask_detector")).to_arrow_table().to_pylist()
    masked = {(r["sample_id"], r["condition"]): r for r in rows if r["kind"] == "mask"}
    assert len(detector) == 12
    for got in detector:
        high, ref = masked[(got["sample_id"], "high")], masked[(got["sample_id"], "full")]
        assert got["mask_entropy_delta"] == pytest.approx(high["token_entropy"] - ref["token_entropy"])
        assert got["mask_truth_margin_delta"] == pytest.approx(high["truth_margin"] - ref["truth_margin"])
    inputs = {
        r["sample_id"]: r for r in lake.sql(named_query("correlation_inputs")).to_arrow_table().to_pylist()
    }
    for got in detector:
        if got["sample_id"] in inputs:  # unparsable answers are not in the correlation table
            assert inputs[got["sample_id"]]["mask_entropy_delta"] == pytest.approx(got["mask_entropy_delta"])

    figures = _causal_figures(lake, world["root"] / "figures")
    assert [name for name, _ in figures] == ["patch_restoration.png", "knockout_by_window.png"]
    for name, _ in figures:
        assert (world["root"] / "figures" / name).stat().st_size > 1000


def test_cli_knockout_prints_its_summary_as_json_and_the_old_group_is_an_alias(lake_world) -> None:
    args = ["--base-run", lake_world["base"], "--layers", "1", "--from", "text", "--lake", lake_world["lake"]]
    result = CliRunner().invoke(main, ["intervene", "knockout", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["kind"] == "knockout" and summary["written"] == 12
    assert {(c["condition"], c["n"]) for c in summary["conditions"]} == {("full", 12), ("1", 12)}
    again = CliRunner().invoke(main, ["ingest", "intervene", "knockout", *args])
    assert again.exit_code == 0 and "0 new samples, 12 already in the lake" in again.output
