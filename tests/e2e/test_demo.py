"""A scaled-down `vrp demo`: every stage on the shipped toys and both tasks, a report with every section."""

from __future__ import annotations

import re

import torch
from click.testing import CliRunner

from vrp.cli import main
from vrp.demo import DEMO_SEED
from vrp.lake import open_lake

QUESTIONS = 30
VQA_QUESTIONS = 20
K = 2
TOYS = ("toy-llava", "toy-paligemma", "toy-qwen2vl")


def test_demo_runs_end_to_end(tmp_path) -> None:
    torch.set_num_threads(1)
    lake_dir, out_dir = tmp_path / "lake", tmp_path / "report"
    args = ["demo", "--lake", str(lake_dir), "--out", str(out_dir), "--questions", str(QUESTIONS)]
    args += ["--vqa-questions", str(VQA_QUESTIONS), "--self-consistency", str(K), "--n-boot", "200"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"seed {DEMO_SEED}" in result.output

    lake = open_lake(str(lake_dir))
    per_run = {
        (model, task): n
        for model, task, n in lake.sql(
            "select s.model, s.task, count(*) from samples s join runs r using (run_id) "
            "where r.base_run_id is null group by all"
        ).fetchall()
    }
    expected = {(name, "yesno"): 3 * QUESTIONS for name in TOYS}
    expected.update({(name, "open"): VQA_QUESTIONS for name in TOYS})
    assert per_run == expected
    generations = lake.sql("select count(*) from generations").fetchall()[0][0]
    assert generations == (3 + 5) * 3 * QUESTIONS * K + (3 + 3) * VQA_QUESTIONS * K
    conditions = lake.sql("select model, dataset, kind from runs where kind in ('blank', 'none')").fetchall()
    assert sorted(conditions) == [
        ("toy-llava", "shapes-pope", "blank"),
        ("toy-llava", "shapes-pope", "none"),
        ("toy-llava", "shapes-vqa", "blank"),
        ("toy-paligemma", "shapes-pope", "blank"),
        ("toy-paligemma", "shapes-vqa", "blank"),
        ("toy-qwen2vl", "shapes-pope", "blank"),
        ("toy-qwen2vl", "shapes-pope", "none"),
        ("toy-qwen2vl", "shapes-vqa", "blank"),
    ]
    kinds = {row[0] for row in lake.sql("select distinct kind from interventions").fetchall()}
    assert kinds == {"mask", "ablate", "destroy", "patch", "knockout"}
    # probes on every base run; a 20-question open-answer run of a good toy may have too few wrong
    # answers to cross-validate, and then the demo must say so instead of fitting nothing silently
    probed = {row[0] for row in lake.sql("select distinct run_id from probe_layers").fetchall()}
    base = lake.sql(
        "select distinct s.run_id, s.model, s.task from samples s join runs r using (run_id) "
        "where r.base_run_id is null"
    ).fetchall()
    assert len(base) == 6
    for run_id, model, task in base:
        if task == "yesno":
            assert run_id in probed, model
        elif run_id not in probed:
            assert f"{model}: no probes (" in result.output, model

    report = (out_dir / "latest" / "report.md").read_text()
    for section in (
        "Headline",
        "Combined scores",
        "POPE",
        "VQA metrics",
        "per question type",
        "Probe",
        "Margin",
        "Visual attribution",
        "Intervention",
        "Provenance",
    ):
        assert re.search(rf"^#+ .*{section}", report, flags=re.MULTILINE | re.IGNORECASE), section
    figures = re.findall(r"\]\((figures/[^)]+)\)", report)
    assert {"figures/patch_restoration.png", "figures/knockout_by_window.png"} <= set(figures)
    for figure in figures:
        assert (out_dir / "latest" / figure).is_file(), figure
    assert "report.html" in result.output
    assert "time per stage" in result.output
    for stage in (
        "ingest shapes-pope",
        "ingest shapes-vqa",
        "probes",
        "patching + knockout",
        "view",
        "report",
    ):
        assert re.search(rf"^  {re.escape(stage)} +\d+\.\d+ min$", result.output, flags=re.MULTILINE), stage

    # the viewer beside the report, and the report's confident-wrong rows open its pages
    assert (out_dir / "view" / "index.html").is_file()
    # one page per sample of an image run (both tasks); condition runs show on the same page
    assert len(list((out_dir / "view" / "s").glob("*.html"))) == 3 * (3 * QUESTIONS + VQA_QUESTIONS)
    links = re.findall(r"\]\(<([^>]+)>\)", report)
    assert links, "the report links no sample to the viewer"
    for link in links:
        assert (out_dir / "latest" / link).resolve().is_file(), link
