"""`vrp query` and `vrp lake ...` through the click commands, on a tiny lake."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from lake_util import ROWS_PER_SAMPLE, ingest, make_run, sample_ids, two_model_lake

from vrp.lake import open_lake
from vrp.lake import query as query_module
from vrp.lake.commands import lake as lake_group
from vrp.lake.commands import query


@pytest.fixture(scope="module")
def lake_root(tmp_path_factory) -> str:
    return two_model_lake(str(tmp_path_factory.mktemp("lake")), 3, 2)


def _run(*args: str):
    return CliRunner().invoke(query, list(args))


REJECTED = [
    ("COPY samples TO 'out.csv'", "COPY"),
    ("ATTACH 'other.db' AS other", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("PRAGMA database_list", "PRAGMA"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("SELECT 1; DROP VIEW samples", "2 statements"),
    ("SELECT 1; SELECT 2", "2 statements"),
    ("SELEC 1", "does not parse"),
]


@pytest.mark.parametrize(("sql", "why"), REJECTED)
def test_non_select_statements_are_rejected_with_a_one_line_reason(lake_root, sql, why):
    result = _run("--lake", lake_root, sql)
    assert result.exit_code != 0
    message = result.output.strip()
    assert "\n" not in message and "rejected" in message and why in message


def test_reading_a_file_outside_the_lake_is_refused(lake_root, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    for sql in (
        f"SELECT * FROM read_csv('{secret}')",
        f"SELECT * FROM '{secret}'",
        "SELECT * FROM read_text('/etc/hostname')",
    ):
        result = _run("--lake", lake_root, sql)
        assert result.exit_code != 0 and "1,2" not in result.output
        assert "disabled" in result.output or "Permission" in result.output, result.output


def test_a_select_joining_two_tables_answers(lake_root):
    sql = (
        "SELECT s.model, count(*) AS n FROM samples s JOIN hidden h USING (run_id, sample_id) "
        "WHERE h.layer = 1 GROUP BY s.model ORDER BY s.model"
    )
    result = _run("--lake", lake_root, "--format", "json", sql)
    assert result.exit_code == 0, result.output
    per_layer = ROWS_PER_SAMPLE["hidden"] // 2  # two layers
    assert json.loads(result.output) == [
        {"model": "toy-llava", "n": 3 * per_layer},
        {"model": "toy-qwen", "n": 2 * per_layer},
    ]


def test_output_formats(lake_root, tmp_path):
    sql = "SELECT sample_id, layer, h FROM hidden WHERE run_id = 'run-b' AND site = 'resid' ORDER BY 1, 2"
    expected = open_lake(lake_root).sql(sql).to_arrow_table()
    table = _run("--lake", lake_root, sql)
    assert table.exit_code == 0 and "4 rows" in table.output and "s0001" in table.output
    csv_text = _run("--lake", lake_root, "--format", "csv", sql).output.splitlines()
    assert csv_text[0] == "sample_id,layer,h" and len(csv_text) == 5
    first_h = json.loads(csv_text[1].split(",", 2)[2].strip('"'))
    assert first_h == pytest.approx(expected.column("h")[0].as_py(), rel=0, abs=0)
    out = tmp_path / "r.parquet"
    result = _run("--lake", lake_root, "--format", "parquet", "--out", str(out), sql)
    assert result.exit_code == 0
    assert pq.read_table(out).equals(expected)
    assert _run("--lake", lake_root, "--format", "parquet", sql).exit_code != 0


def test_explain_is_allowed(lake_root):
    result = _run("--lake", lake_root, "EXPLAIN SELECT count(*) FROM layers")
    assert result.exit_code == 0, result.output


def test_named_queries_are_listed_and_run(lake_root, tmp_path, monkeypatch):
    (tmp_path / "accuracy.sql").write_text(
        "-- accuracy per model\nSELECT model, count(*) AS n FROM samples GROUP BY 1\n"
    )
    (tmp_path / "bad.sql").write_text("-- not allowed\nDROP VIEW samples\n")
    monkeypatch.setattr(query_module, "QUERIES_DIR", tmp_path)
    listing = _run("--list")
    assert listing.exit_code == 0
    assert "accuracy" in listing.output and "accuracy per model" in listing.output
    result = _run("--lake", lake_root, "--format", "csv", "--name", "accuracy")
    assert result.exit_code == 0 and sorted(result.output.splitlines()[1:]) == ["toy-llava,3", "toy-qwen,2"]
    assert "rejected" in _run("--lake", lake_root, "--name", "bad").output
    assert "no named query" in _run("--lake", lake_root, "--name", "missing").output
    assert "bad query name" in _run("--lake", lake_root, "--name", "../secret").output


def test_a_missing_lake_is_a_clear_error(tmp_path):
    result = _run("--lake", str(tmp_path / "nowhere"), "SELECT 1")
    assert result.exit_code != 0 and "no lake at" in result.output


def _damage(path: str, how: str) -> None:
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # overwrite the footer length and part of the footer, keep the size
        data[-12:-4] = b"\xff" * 8
    with open(path, "wb") as fh:
        fh.write(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "footer"])
def test_a_damaged_parquet_file_is_named_by_lake_check_and_vrp_query(tmp_path, how):
    root = str(tmp_path)
    ingest(root, make_run(), sample_ids(2))
    victim = open_lake(root).delta("samples").file_uris()[0]
    _damage(victim, how)
    check = CliRunner().invoke(lake_group, ["check", "--lake", root])
    assert check.exit_code == 1
    damaged = [line for line in check.output.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1 and os.path.basename(victim) in damaged[0]
    result = _run("--lake", root, "SELECT count(*), avg(p_yes) FROM samples")
    assert result.exit_code != 0
    assert os.path.basename(victim) in result.output and "samples" in result.output
    assert _run("--lake", root, "SELECT count(*) FROM layers").exit_code == 0  # other tables still read


def test_lake_info_compact_and_drop_run(tmp_path):
    root = str(tmp_path)
    ingest(root, make_run("run-a"), sample_ids(6), batch_size=1)
    ingest(root, make_run("run-b"), sample_ids(2))
    runner = CliRunner()
    info = runner.invoke(lake_group, ["info", "--lake", root])
    assert info.exit_code == 0
    hidden_line = next(line for line in info.output.splitlines() if line.startswith("hidden "))
    assert hidden_line.split()[3] == str(8 * ROWS_PER_SAMPLE["hidden"])
    assert "run-a" in info.output and "done=6" in info.output

    before = (
        open_lake(root).sql("SELECT * FROM hidden ORDER BY run_id, sample_id, site, layer").to_arrow_table()
    )
    files_before = len(open_lake(root).delta("hidden").file_uris())
    assert runner.invoke(lake_group, ["compact", "--lake", root]).exit_code == 0
    lake = open_lake(root)
    assert len(lake.delta("hidden").file_uris()) < files_before
    assert (
        lake.sql("SELECT * FROM hidden ORDER BY run_id, sample_id, site, layer")
        .to_arrow_table()
        .equals(before)
    )

    refused = runner.invoke(lake_group, ["drop-run", "--lake", root, "run-a"], input="n\n")
    assert refused.exit_code != 0 and open_lake(root).arrow("samples").num_rows == 8
    dropped = runner.invoke(lake_group, ["drop-run", "--lake", root, "run-a"], input="y\n")
    assert dropped.exit_code == 0, dropped.output
    lake = open_lake(root)
    for name, per in ROWS_PER_SAMPLE.items():
        assert dict(lake.sql(f"SELECT run_id, count(*) FROM {name} GROUP BY 1").fetchall()) == {
            "run-b": 2 * per
        }
    assert [r[0] for r in lake.sql("SELECT run_id FROM runs").fetchall()] == ["run-b"]
    assert runner.invoke(lake_group, ["drop-run", "--lake", root, "--yes", "run-a"]).exit_code != 0


def test_a_query_past_its_timeout_is_cancelled_with_a_clear_error(lake_root):
    """A ~6 s cross join with --timeout 0.2 ends early with an error naming the timeout."""
    heavy = "SELECT sum(hash(a.i + b.i)) FROM range(30000) a(i), range(30000) b(i)"
    result = _run("--lake", lake_root, "--timeout", "0.2", heavy)
    assert result.exit_code == 1
    assert "cancelled after 0.2 s (--timeout)" in result.output
    assert _run("--lake", lake_root, "--timeout", "30", "SELECT count(*) AS n FROM samples").exit_code == 0
    assert _run("--lake", lake_root, "--timeout", "0", "SELECT 1").exit_code == 2
