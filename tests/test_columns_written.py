"""No dead columns: a full study on a small POPE file writes a value into every schema column.

The study is the one `vrp demo` runs, on the shipped toy-llava (it answers, so probes have both
classes): ingest with self-consistency, the probes, and the three interventions. A POPE file
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

#: (table, column) -> why a full yes/no study leaves it null in every row.
NULL_BY_DESIGN: dict[tuple[str, str], str] = {}


def _vrp(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def full_lake(shapes_workspace) -> Path:
    root, data = shapes_workspace("columns", images=QUESTIONS, seed=2026)
    lines = (data / "adversarial.jsonl").read_text(encoding="utf-8").splitlines()[:QUESTIONS]
    rows = [json.loads(line) | {"category": "adversarial"} for line in lines]
    broken = data / "images" / "broken.png"
    broken.write_bytes(b"not a picture")
    rows.append(rows[0] | {"question_id": 10_000, "image": broken.name})
    pope = root / "pope_adversarial.jsonl"
    pope.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lake = str(root / "lake")
    _vrp(
        "ingest", "run", "--model", "toy-llava", "--dataset", "pope", "--pope-file", str(pope),
        "--image-dir", str(data / "images"), "--self-consistency", str(K), "--batch-size", "8",
        "--lake", lake,
    )  # fmt: skip
    _vrp("analyze", "probes", "--lake", lake, "--n-boot", "50")
    (base,) = open_lake(lake).arrow("runs", columns=["run_id"]).column("run_id").to_pylist()
    intervene = ("ingest", "intervene")
    _vrp(*intervene, "mask", "--base-run", base, "--lake", lake, "--batch-size", "8")
    _vrp(*intervene, "ablate", "--base-run", base, "--layer", "-1", "--lake", lake, "--batch-size", "8")
    _vrp(*intervene, "destroy", "--base-run", base, "--layer", "peak", "--lake", lake, "--batch-size", "8")
    return Path(lake)


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_column_is_written(full_lake, table) -> None:
    data = open_lake(full_lake).arrow(table)
    assert data.num_rows > 0, f"the full study wrote no {table} rows"
    never = [
        column
        for column in data.column_names
        if pc.all(pc.is_null(data.column(column))).as_py() and (table, column) not in NULL_BY_DESIGN
    ]
    assert not never, f"{table}: columns no code path writes: {never}"


def test_the_allow_list_names_real_columns_that_really_stay_null(full_lake) -> None:
    lake = open_lake(full_lake)
    for (table, column), why in NULL_BY_DESIGN.items():
        assert why and column in TABLES[table].schema.names, (table, column)
        assert lake.arrow(table, columns=[column]).column(column).null_count == lake.arrow(table).num_rows
