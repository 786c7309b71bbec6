"""Crash safety and concurrency of the lake with real processes (spawned: delta-rs panics after fork)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import lake_util
from click.testing import CliRunner
from lake_util import ROWS_PER_SAMPLE, batch_rows, ingest, make_run, sample_ids

from vrp.lake import maintenance, open_lake
from vrp.lake.commands import lake as lake_group
from vrp.schema import TABLES

SPAWN = multiprocessing.get_context("spawn")


def _start(target, **kwargs) -> multiprocessing.Process:
    process = SPAWN.Process(target=target, kwargs=kwargs)
    process.start()
    return process


def _join(process: multiprocessing.Process, timeout: float = 120) -> int:
    process.join(timeout)
    if process.is_alive():
        process.kill()
        raise AssertionError("writer process hung")
    return process.exitcode


def _data_counts(lake) -> dict[str, int]:
    return {name: lake.arrow(name).num_rows for name in TABLES if name != "runs"}


def _duplicates(lake, name: str) -> int:
    key = ", ".join(TABLES[name].key)
    return lake.sql(
        f"SELECT count(*) FROM (SELECT {key} FROM {name} GROUP BY ALL HAVING count(*) > 1)"
    ).fetchall()[0][0]


def _parquet_files(folder: str) -> set[str]:
    out = set()
    for root, _dirs, files in os.walk(folder):
        if "_delta_log" not in root:
            out.update(os.path.join(root, f) for f in files if f.endswith(".parquet"))
    return out


def test_sigkill_mid_commit_leaves_tables_unchanged_and_the_rerun_completes(tmp_path):
    layers = 150  # x 2 sites = 300 partition files in one commit: a wide window to land the kill in
    ids = sample_ids(3)
    for attempt in range(4):
        root = str(tmp_path / f"lake{attempt}")
        run = make_run()
        ingest(root, run, ["p0000"])  # a committed sample before the crash
        lake = open_lake(root)
        versions, counts = lake.versions(), _data_counts(lake)
        committed = _parquet_files(os.path.join(root, "hidden"))
        child = _start(lake_util.child_big_commit, root=root, run=run, ids=ids, layers=layers)
        deadline = time.time() + 60
        while time.time() < deadline and child.is_alive():
            if _parquet_files(os.path.join(root, "hidden")) - committed:
                break
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
        _join(child)
        lake = open_lake(root)
        if lake.versions()["hidden"] == versions["hidden"]:
            break  # the kill landed before the commit: the case under test
    else:
        raise AssertionError("could not kill the writer mid-commit in 4 attempts")
    assert child.exitcode == -signal.SIGKILL
    new_versions = lake.versions()
    assert {k: v for k, v in new_versions.items() if k != "runs"} == {
        k: v for k, v in versions.items() if k != "runs"
    }
    assert _data_counts(lake) == counts
    orphans = {o.path for o in maintenance.find_orphans(lake)}
    uncommitted = {os.path.normpath(p) for p in _parquet_files(os.path.join(root, "hidden")) - committed}
    assert uncommitted and uncommitted <= orphans
    result = CliRunner().invoke(lake_group, ["check", "--lake", root])
    assert result.exit_code == 0, result.output
    assert result.output.count("ORPHAN") == len(orphans)

    lake_util.child_big_commit(root, run, ids, layers)  # the rerun, in this process
    lake = open_lake(root)
    assert lake.arrow("hidden").num_rows == (1 * ROWS_PER_SAMPLE["hidden"]) + 3 * layers * 2
    assert lake.arrow("samples").num_rows == 4
    result = CliRunner().invoke(lake_group, ["vacuum", "--lake", root, "--yes", "--min-age-minutes", "0"])
    assert result.exit_code == 0 and f"removed {len(orphans)} orphan" in result.output
    assert maintenance.find_orphans(open_lake(root)) == []
    assert open_lake(root).arrow("hidden").num_rows == ROWS_PER_SAMPLE["hidden"] + 3 * layers * 2


def test_a_kill_between_other_tables_and_samples_leaves_no_visible_sample_and_resume_is_exact(tmp_path):
    root = str(tmp_path)
    run = make_run()
    ids = sample_ids(6)
    child = _start(
        lake_util.child_ingest, root=root, run=run, ids=ids, batch_size=2, die_before_samples_of_batch=1
    )
    assert _join(child) == -signal.SIGKILL
    lake = open_lake(root)
    complete = {r[0] for r in lake.sql("SELECT sample_id FROM samples").fetchall()}
    assert complete == set(ids[:2])
    # the killed batch's other tables are committed, but no query joining on samples sees them
    assert lake.arrow("hidden", filter={"sample_id": ids[2]}).num_rows == ROWS_PER_SAMPLE["hidden"]
    visible = lake.sql("SELECT count(*) FROM hidden JOIN samples USING (run_id, sample_id)").fetchall()[0][0]
    assert visible == 2 * ROWS_PER_SAMPLE["hidden"]

    done, written = ingest(root, run, ids, batch_size=2)
    assert done == set(ids[:2]) and written == ids[2:]
    lake = open_lake(root)
    for name, per in ROWS_PER_SAMPLE.items():
        assert lake.arrow(name).num_rows == 6 * per, name
        assert _duplicates(lake, name) == 0, name


def test_two_spawned_writers_appending_to_the_same_tables_lose_no_rows(tmp_path):
    root = str(tmp_path)
    a = _start(lake_util.child_ingest, root=root, run=make_run("run-a"), ids=sample_ids(8, "a"), batch_size=2)
    b = _start(lake_util.child_ingest, root=root, run=make_run("run-b"), ids=sample_ids(8, "b"), batch_size=2)
    assert _join(a) == 0 and _join(b) == 0
    lake = open_lake(root)
    for name, per in ROWS_PER_SAMPLE.items():
        got = dict(lake.sql(f"SELECT run_id, count(*) FROM {name} GROUP BY run_id").fetchall())
        assert got == {"run-a": 8 * per, "run-b": 8 * per}, name
    assert sorted(lake.sql("SELECT run_id, status, n_done FROM runs").fetchall()) == [
        ("run-a", "complete", 8),
        ("run-b", "complete", 8),
    ]


def test_three_shards_one_killed_and_resumed_keep_every_shards_rows_once(tmp_path):
    root = str(tmp_path)
    run = make_run()
    ids = sample_ids(18)
    owned = [ids[i::3] for i in range(3)]
    # shard 2 leaves its last two samples to a live writer below (this process)
    children = [
        _start(lake_util.child_ingest, root=root, run=run, ids=owned[0], shard=(0, 3), owned=owned[0]),
        _start(
            lake_util.child_ingest,
            root=root,
            run=run,
            ids=owned[1],
            shard=(1, 3),
            owned=owned[1],
            die_before_samples_of_batch=1,
        ),
        _start(lake_util.child_ingest, root=root, run=run, ids=owned[2][:4], shard=(2, 3), owned=owned[2]),
    ]
    codes = [_join(c) for c in children]
    assert codes == [0, -signal.SIGKILL, 0]

    # shard 2 is still at work: its last batch's other tables are committed, its samples not yet
    live = open_lake(root).writer(run, shard=(2, 3), owned_sample_ids=owned[2])
    assert live.begin() == set(owned[0] + owned[1][:2] + owned[2][:4])
    in_flight = owned[2][4:]
    rows = batch_rows(in_flight)
    live.commit({k: v for k, v in rows.items() if k != "samples"})

    # shard 1 resumes: it must clean up only its own incomplete samples
    done, written = ingest(root, run, owned[1], shard=(1, 3), owned=owned[1])
    assert written == owned[1][2:]
    lake = open_lake(root)
    for sid in in_flight:
        assert lake.arrow("hidden", filter={"sample_id": sid}).num_rows == ROWS_PER_SAMPLE["hidden"]

    live.commit({"samples": rows["samples"]})
    live.finish()
    lake = open_lake(root)
    for name, per in ROWS_PER_SAMPLE.items():
        assert lake.arrow(name).num_rows == 18 * per, name
        assert _duplicates(lake, name) == 0, name
    assert lake.sql("SELECT n_done, status FROM runs").fetchall() == [(18, "complete")]
