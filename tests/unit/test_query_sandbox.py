"""The `vrp query` sandbox against the escapes a red team found: no file written or read through
DuckDB's temp directory, and EXPLAIN only around a SELECT."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from lake_util import ingest, make_run, sample_ids

from vrp.lake.commands import query


@pytest.fixture(scope="module")
def lake_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("lake"))
    ingest(root, make_run("run-a"), sample_ids(2))
    return root


def test_explain_analyze_cannot_write_into_the_default_temp_directory(lake_root, tmp_path, monkeypatch):
    # DuckDB's default temp directory is ./.tmp, allowed even with external access disabled
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    notes = tmp_path / ".tmp" / "notes.txt"
    notes.write_text("my notes\n")
    attack = "EXPLAIN ANALYZE COPY (SELECT 'pwned') TO '.tmp/notes.txt'"
    result = CliRunner().invoke(query, ["--lake", lake_root, attack])
    assert result.exit_code != 0 and "rejected" in result.output
    assert "\n" not in result.output.strip()
    assert notes.read_text() == "my notes\n"
    read = CliRunner().invoke(query, ["--lake", lake_root, "SELECT content FROM read_text('.tmp/*')"])
    assert read.exit_code != 0 and "my notes" not in read.output


@pytest.mark.parametrize(
    "sql",
    [
        "EXPLAIN COPY (SELECT 1) TO 'x.csv'",
        "explain\nanalyze COPY samples TO 'x.csv'",
        "EXPLAIN (FORMAT json) ATTACH 'x.db'",
        "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
        "EXPLAIN ANALYZE EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'",
        "EXPLAIN",
    ],
)
def test_explain_of_anything_but_a_select_is_rejected(lake_root, tmp_path, monkeypatch, sql):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(query, ["--lake", lake_root, "--", sql])
    assert result.exit_code != 0 and "rejected" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "sql",
    [
        "EXPLAIN SELECT count(*) FROM samples",
        "-- why is it slow\nexplain analyze SELECT count(*) FROM samples",
        "/* plan */ EXPLAIN (FORMAT json) SELECT 1",
    ],
)
def test_explain_of_a_select_still_runs(lake_root, sql):
    result = CliRunner().invoke(query, ["--lake", lake_root, "--", sql])
    assert result.exit_code == 0, result.output


def test_a_query_that_spills_uses_a_private_temp_directory_that_is_removed(lake_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sql = "SELECT current_setting('temp_directory') AS t"
    result = CliRunner().invoke(query, ["--lake", lake_root, "--format", "csv", sql])
    assert result.exit_code == 0, result.output
    temp = result.output.splitlines()[1]
    assert "vrp-query-" in temp
    assert not os.path.exists(temp)
    assert list(tmp_path.iterdir()) == []


def test_the_readme_says_the_python_sql_api_is_not_sandboxed():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    shown = readme.index('lake.sql("')
    note = readme.index("`lake.sql()` is **not sandboxed**")
    assert 0 < note - shown < 600  # right where the README shows it
