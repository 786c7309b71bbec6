"""No dead columns: a full study on a small POPE file writes a value into every schema column.

The study is the one `vrp demo` runs, on the shipped toy-llava (it answers, so probes have both
classes): ingest with self-consistency, the probes, the interventions and a blank-image run. A POPE file
with categories and one undecodable image makes `failures` and `samples.category` real too.
A column that is null in every row fails the test unless ``NULL_BY_DESIGN`` names it with the
reason (docs/ARCHITECTURE.md section 4 defines every column).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest
from click.testing import CliRunner

from vrp.cli import main
from vrp.lake import open_lake
from vrp.schema import TABLES

QUESTIONS = 24
K = 2
INTERVENE = ("intervene",)

#: task -> {(table, column): why a full study of that task leaves the column null in every row}.
NULL_FOR_TASK: dict[str, dict[tuple[str, str], str]] = {
    "yesno": {
        ("samples", "answers"): "POPE has one label per question, no list of human answers",
        ("samples", "question_type"): "VQAv2's question types; POPE questions have none",
        ("samples", "answer_type"): "VQAv2's answer types; POPE answers are all yes/no",
    },
    "open": {
        **{
            (table, column): "yes/no first-token statistics: an open answer has no yes and no tokens"
            for table, column in [
                ("samples", "p_yes"),
                ("samples", "p_no"),
                ("samples", "yes_no_margin"),
                ("layers", "lens_yes_no_margin"),
                ("interventions", "p_yes"),
                ("interventions", "p_no"),
                ("interventions", "yes_no_margin"),
            ]
        },
        ("samples", "object"): "POPE's questioned object; an open question names none",
        ("samples", "category"): "POPE's category field; shapes-VQA has none",
        ("samples", "source"): "POPE's image source (coco, aokvqa, gqa); shapes-VQA has none",
        (
            "samples",
            "first_token_kl",
        ): "image-condition runs only; this study runs none (the yes/no one does)",
        ("interventions", "donor_sample_id"): "patch runs only; this study masks (the yes/no one patches)",
        ("interventions", "restoration"): "patch runs only; this study masks (the yes/no one patches)",
    },
}

#: the tables each study writes (an open study runs no probes and no neuron interventions, and
#: every image loads)
TABLES_FOR_TASK = {
    "yesno": sorted(TABLES),
    "open": sorted(set(TABLES) - {"probe_layers", "probe_neurons", "failures"}),
}


def _vrp(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _base_run(lake: str) -> str:
    (base,) = open_lake(lake).arrow("runs", columns=["run_id"]).column("run_id").to_pylist()
    return base


def _yesno_study(shapes_workspace) -> Path:
    """POPE with categories and one undecodable image: ingest, probes, and every intervention kind."""
    root, data = shapes_workspace("columns-yesno", images=QUESTIONS, seed=2026)
    lines = (data / "adversarial.jsonl").read_text(encoding="utf-8").splitlines()[:QUESTIONS]
    rows = [json.loads(line) | {"category": "adversarial"} for line in lines]
    broken = data / "images" / "broken.png"
    broken.write_bytes(b"not a picture")
    rows.append(rows[0] | {"question_id": 10_000, "image": broken.name})
    pope = root / "coco_pope_adversarial.jsonl"  # the file name says the image source
    pope.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lake = str(root / "lake")
    _vrp(
        "ingest", "run", "--model", "toy-llava", "--dataset", "pope", "--pope-file", str(pope),
        "--image-dir", str(data / "images"), "--self-consistency", str(K), "--batch-size", "8",
        "--lake", lake,
    )  # fmt: skip
    _vrp("analyze", "probes", "--lake", lake, "--n-boot", "50")
    base = _base_run(lake)
    _vrp(*INTERVENE, "mask", "--base-run", base, "--lake", lake, "--batch-size", "8")
    _vrp(*INTERVENE, "ablate", "--base-run", base, "--layer", "-1", "--lake", lake, "--batch-size", "8")
    _vrp(*INTERVENE, "destroy", "--base-run", base, "--layer", "peak", "--lake", lake, "--batch-size", "8")
    _vrp(*INTERVENE, "patch", "--base-run", base, "--layers", "-1", "--lake", lake, "--batch-size", "8")
    _vrp(*INTERVENE, "knockout", "--base-run", base, "--layers", "-1", "--lake", lake, "--batch-size", "8")
    # an image-condition run (as the demo runs): its samples carry the first-token KL
    _vrp(
        "ingest", "run", "--model", "toy-llava", "--dataset", "pope", "--pope-file", str(pope),
        "--image-dir", str(data / "images"), "--self-consistency", str(K), "--batch-size", "8",
        "--image-condition", "blank", "--lake", lake,
    )  # fmt: skip
    return Path(lake)


def _open_study(tmp_path_factory) -> Path:
    """shapes-VQA (open answers, VQA scoring): ingest with self-consistency, then mask."""
    root = tmp_path_factory.mktemp("columns-open")
    _vrp("data", "shapes-vqa", "--out", str(root / "vqa"), "--images", "6", "--seed", "2026")
    lake = str(root / "lake")
    _vrp(
        "ingest", "run", "--model", "toy-llava", "--dataset", "shapes-vqa", "--data-dir", str(root / "vqa"),
        "--limit", str(QUESTIONS), "--self-consistency", str(K), "--batch-size", "8", "--lake", lake,
    )  # fmt: skip
    _vrp(*INTERVENE, "mask", "--base-run", _base_run(lake), "--lake", lake, "--batch-size", "8")
    return Path(lake)


@pytest.fixture(scope="module")
def studies(shapes_workspace, tmp_path_factory) -> dict[str, Path]:
    return {"yesno": _yesno_study(shapes_workspace), "open": _open_study(tmp_path_factory)}


@pytest.mark.parametrize(
    ("task", "table"), [(task, table) for task, tables in TABLES_FOR_TASK.items() for table in tables]
)
def test_every_column_is_written(studies, task, table) -> None:
    data = open_lake(studies[task]).arrow(table)
    assert data.num_rows > 0, f"the {task} study wrote no {table} rows"
    allowed = NULL_FOR_TASK[task]
    never = [
        column
        for column in data.column_names
        if pc.all(pc.is_null(data.column(column))).as_py() and (table, column) not in allowed
    ]
    assert not never, f"{task} study, {table}: columns no code path writes: {never}"


def test_the_allow_lists_name_real_columns_that_really_stay_null(studies) -> None:
    for task, allowed in NULL_FOR_TASK.items():
        lake = open_lake(studies[task])
        for (table, column), why in allowed.items():
            assert why and column in TABLES[table].schema.names, (task, table, column)
            values = lake.arrow(table, columns=[column]).column(column)
            assert values.null_count == len(values), (
                f"{task}: {table}.{column} is written: drop it from the list"
            )
