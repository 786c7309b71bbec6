"""Smaller things the red team found: vacuum reporting files it already deleted, and concurrent
commits of one application id surfacing Delta's CommitFailedError."""

from __future__ import annotations

import threading

import pyarrow as pa
from click.testing import CliRunner
from lake_util import ingest, make_run, sample_ids

from vrp.cli import main
from vrp.lake import delta, open_lake
from vrp.schema import TABLES


def test_vacuum_with_retain_hours_0_reports_each_file_once(tmp_path):
    root = str(tmp_path / "lake")
    ingest(root, make_run(), sample_ids(4), batch_size=1)
    runner = CliRunner()
    assert runner.invoke(main, ["lake", "compact", "--lake", root]).exit_code == 0
    first = runner.invoke(main, ["lake", "vacuum", "--lake", root, "--retain-hours", "0", "--yes"])
    assert first.exit_code == 0, first.output
    n_first = int(first.output.splitlines()[-1].split()[1])
    assert n_first > 0
    second = runner.invoke(main, ["lake", "vacuum", "--lake", root, "--retain-hours", "0", "--yes"])
    assert second.exit_code == 0
    assert second.output.splitlines()[-1].startswith("removed 0 file(s)"), second.output
    assert open_lake(root).dataset("samples").count_rows() == 4


def _failure_row(i: int) -> pa.Table:
    spec = TABLES["failures"]
    row = {name: [None] for name in spec.schema.names}
    row.update({"run_id": ["r"], "sample_id": [f"s{i}"], "model": ["m"], "stage": ["load"]})
    return pa.table(row, schema=spec.schema.remove_metadata())


def test_concurrent_commits_of_one_app_id_never_raise(tmp_path):
    root = str(tmp_path / "lake")
    spec = TABLES["failures"]
    delta.ensure_table(root, spec)
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def commit(i: int) -> None:
        table = delta.load_table(root, spec)
        start.wait()
        try:
            delta.append(table, spec, _failure_row(i), app_id="r:0/1", version=i + 1)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    table = delta.load_table(root, spec)
    # every commit either landed or found a later version of its app id already there
    assert table.transaction_version("r:0/1") == 6
    assert 1 <= table.to_pyarrow_dataset().count_rows() <= 6
