"""Open answers downstream of capture: the vqa_metrics query, type-map tags, intervention deltas
per question type and the report's section per task, each checked against a direct computation."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vrp.analysis import data
from vrp.analysis.interventions import deltas_from_lake
from vrp.analysis.report import write_report
from vrp.analysis.type_map import TypeMapError, read_type_map, tag_metrics, tag_of
from vrp.cli import main
from vrp.ingest.datasets import generate_shapes_vqa
from vrp.ingest.run import IngestOptions, run_ingest
from vrp.interventions import plan_mask, run_intervention
from vrp.lake import open_lake

TOY = Path(__file__).resolve().parents[2] / "vrp" / "toys" / "toy-paligemma"
QUIET = {"echo": lambda _line: None}
TYPES = {"what color": "colour", "what": "other what", "how many": "counting"}


@pytest.fixture(scope="module")
def lake_dir(tmp_path_factory) -> str:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vqa-analysis")
    data_dir = generate_shapes_vqa(root / "svqa", images=6, seed=8)
    lake = str(root / "lake")
    options = IngestOptions(model=str(TOY), dataset="shapes-vqa", data_dir=str(data_dir), self_consistency=0)
    run_id = run_ingest(options, lake, **QUIET).run_id
    run_intervention(
        plan_mask(open_lake(lake), run_id, ratio=0.5, conditions=("full", "high")), lake, **QUIET
    )
    return lake


def _samples(lake_dir: str) -> list[dict]:
    return open_lake(lake_dir).arrow("samples").to_pylist()


def test_vqa_metrics_equal_a_direct_computation(lake_dir: str) -> None:
    rows = data.query(open_lake(lake_dir), "vqa_metrics").to_pylist()
    samples = _samples(lake_dir)
    assert samples and all(s["task"] == "open" for s in samples)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for s in samples:
        groups[("overall", "all")].append(s)
        groups[("answer_type", s["answer_type"])].append(s)
        groups[("question_type", s["question_type"])].append(s)
    assert {(r["level"], r["type"]) for r in rows} == set(groups)
    for r in rows:
        part = groups[(r["level"], r["type"])]
        scored = [s for s in part if s["score"] is not None]
        assert r["n"] == len(part) and r["n_scored"] == len(scored)
        assert r["accuracy"] == pytest.approx(np.mean([bool(s["correct"]) for s in scored]))
        assert r["mean_score"] == pytest.approx(np.mean([s["score"] for s in scored]))


def test_type_map_reads_both_formats_and_takes_the_longest_prefix(tmp_path: Path) -> None:
    (tmp_path / "map.json").write_text(json.dumps(TYPES))
    (tmp_path / "map.tsv").write_text(
        "# study tags\nwhat color\tcolour\nwhat\tother what\nhow many,counting\n"
    )
    assert read_type_map(tmp_path / "map.json") == read_type_map(tmp_path / "map.tsv") == TYPES
    assert tag_of("what color is the", TYPES) == "colour"
    assert tag_of("What is in the", TYPES) == "other what"
    assert tag_of("is there a", TYPES) is None
    (tmp_path / "bad.tsv").write_text("what color\n")
    with pytest.raises(TypeMapError, match="line 1"):
        read_type_map(tmp_path / "bad.tsv")


def test_tag_metrics_equal_pooling_the_samples_by_tag(lake_dir: str) -> None:
    rows = data.query(open_lake(lake_dir), "vqa_metrics").to_pylist()
    by_tag: dict[str, list[dict]] = defaultdict(list)
    for s in _samples(lake_dir):
        by_tag[tag_of(s["question_type"], TYPES) or "(untagged)"].append(s)
    got = {r["tag"]: r for r in tag_metrics(rows, TYPES)}
    assert set(got) == set(by_tag)
    for tag, part in by_tag.items():
        scored = [s for s in part if s["score"] is not None]
        assert got[tag]["n"] == len(part) and got[tag]["n_scored"] == len(scored)
        assert got[tag]["accuracy"] == pytest.approx(np.mean([bool(s["correct"]) for s in scored]))
        assert got[tag]["mean_score"] == pytest.approx(np.mean([s["score"] for s in scored]))


def test_intervention_deltas_per_question_type(lake_dir: str) -> None:
    lake = open_lake(lake_dir)
    effects = deltas_from_lake(lake, by="question_type", n_boot=50)
    rows = lake.arrow("interventions").to_pylist()
    qtype = {s["sample_id"]: s["question_type"] for s in _samples(lake_dir)}
    for e in (e for e in effects if e["group"] is not None):
        high = [r for r in rows if r["condition"] == "high" and qtype[r["sample_id"]] == e["group"]]
        full = {r["sample_id"]: r for r in rows if r["condition"] == "full"}
        assert e["n"] == len(high)
        assert e["acc"] == pytest.approx(np.mean([bool(r["correct"]) for r in high]))
        assert e["acc_ref"] == pytest.approx(np.mean([bool(full[r["sample_id"]]["correct"]) for r in high]))
        assert e["margin"] == pytest.approx(np.mean([r["truth_margin"] for r in high]))
    assert {e["group"] for e in effects} - {None} == set(qtype.values())
    tagged = deltas_from_lake(lake, by="type_tag", type_map=TYPES, n_boot=50)
    assert {e["group"] for e in tagged} - {None} <= {"colour", "other what", "counting"}


def test_the_report_has_a_vqa_section_and_no_pope_table_for_open_runs(lake_dir: str, tmp_path: Path) -> None:
    outcome = write_report(lake_dir, tmp_path / "report", n_boot=50, type_map=TYPES)
    text = (outcome.path / "report.md").read_text()
    assert "VQA metrics (open answers)" in text and "VQA metrics per question type" in text
    assert "tag: colour" in text and "Interventions per type tag" in text
    assert "POPE metrics" not in text
    (tmp_path / "map.json").write_text(json.dumps(TYPES))
    args = ["report", "--lake", lake_dir, "--out", str(tmp_path / "r2"), "--n-boot", "50"]
    result = CliRunner().invoke(main, [*args, "--type-map", str(tmp_path / "map.json")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        main, ["analyze", "vqa", "--lake", lake_dir, "--type-map", str(tmp_path / "map.json")]
    )
    assert result.exit_code == 0 and "counting" in result.output and "answer_type" in result.output
