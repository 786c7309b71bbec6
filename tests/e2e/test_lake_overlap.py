"""Two ingests of one run that overlap in time never store a sample twice.

The red team's case: a second `vrp ingest run` of the same configuration starts while the first
is between its other-table commits and its `samples` commit. Its resume clean-up used to delete
the first one's in-flight rows as stale, and both then committed the same samples (96 samples for
a 48-question run). Now the second one is refused while the first is alive; forced, it still
cannot duplicate a `samples` row; and `lake check` reports any key stored twice.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from lake_util import ROWS_PER_SAMPLE, batch_rows, ingest, make_run, sample_ids

from vrp.lake import delta, open_lake
from vrp.lake.commands import lake as lake_group
from vrp.lake.heartbeat import RunBusyError
from vrp.schema import TABLES

SPAWN = multiprocessing.get_context("spawn")
IDS = sample_ids(6)


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


def child_paused_before_samples(root: str, ids: list[str], paused: str, go: str) -> None:
    """A writer that commits every other table of its one batch, then waits before `samples`."""
    real_append = delta.append

    def append(dt, spec, data, **kwargs):  # noqa: ANN001, ANN202 - same signature as delta.append
        if spec.name == "samples":
            Path(paused).touch()
            _wait_for(Path(go))
        return real_append(dt, spec, data, **kwargs)

    delta.append = append
    ingest(root, make_run(), ids, batch_size=len(ids))


def _start_paused_child(tmp_path: Path, root: str) -> tuple[multiprocessing.Process, Path]:
    paused, go = tmp_path / "paused", tmp_path / "go"
    child = SPAWN.Process(target=child_paused_before_samples, args=(root, IDS, str(paused), str(go)))
    child.start()
    _wait_for(paused)
    return child, go


def _sample_count(root: str) -> int:
    return open_lake(root).dataset("samples").count_rows()


def test_a_second_writer_of_a_live_run_is_refused(tmp_path):
    root = str(tmp_path / "lake")
    child, go = _start_paused_child(tmp_path, root)
    try:
        with pytest.raises(RunBusyError, match="--force"):
            ingest(root, make_run(), IDS)
        busy_check = open_lake(root).writer(make_run("run-b"))  # another run is not held
        busy_check.begin()
        busy_check.close()
    finally:
        go.touch()
        child.join(60)
    assert child.exitcode == 0
    done, written = ingest(root, make_run(), IDS)  # the first one finished: nothing left to do
    assert done == set(IDS) and written == []
    lake = open_lake(root)
    for name, per_sample in ROWS_PER_SAMPLE.items():
        assert lake.dataset(name).count_rows() == per_sample * len(IDS), name


def test_a_forced_overlap_in_the_commit_window_stores_each_sample_once(tmp_path):
    root = str(tmp_path / "lake")
    child, go = _start_paused_child(tmp_path, root)
    try:
        # forced while the child sits between its other-table commits and its samples commit:
        # the clean-up deletes the child's in-flight rows, then the child's samples land
        writer = open_lake(root).writer(make_run())
        writer.begin(force=True)
    finally:
        go.touch()
        child.join(60)
    assert child.exitcode == 0
    writer.commit(batch_rows(IDS))  # re-reads the marker table: every sample is complete now
    writer.finish()
    assert _sample_count(root) == len(IDS)
    lake = open_lake(root)
    counts = lake.sql("SELECT count(*) AS n, count(DISTINCT sample_id) AS d FROM samples").fetchall()
    assert counts == [(len(IDS), len(IDS))]
    # forcing over a live writer cost the child's in-flight rows: check says so, repair reopens
    # those samples and the next ingest captures them again
    runner = CliRunner()
    check = runner.invoke(lake_group, ["check", "--lake", root])
    assert check.exit_code == 1 and "DUPLICATE" not in check.output
    assert "INCOMPLETE hidden: run run-a: 6 complete sample(s)" in check.output, check.output
    assert runner.invoke(lake_group, ["repair", "--lake", root, "--yes"]).exit_code == 0
    done, written = ingest(root, make_run(), IDS)
    assert done == set() and written == IDS
    lake = open_lake(root)
    for name, per_sample in ROWS_PER_SAMPLE.items():
        assert lake.dataset(name).count_rows() == per_sample * len(IDS), name
    assert runner.invoke(lake_group, ["check", "--lake", root]).exit_code == 0


@pytest.mark.parametrize("layout", ["same shard", "another layout"])
def test_a_writer_drops_samples_another_writer_completed_since_it_began(tmp_path, layout):
    root = str(tmp_path / "lake")
    first = open_lake(root).writer(make_run())
    first.begin()
    if layout == "same shard":  # the same application transaction id: its versions must not collide
        second = open_lake(root).writer(make_run())
    else:  # a writer of another shard layout (its own application transaction id)
        second = open_lake(root).writer(make_run(), shard=(0, 2), owned_sample_ids=IDS)
    second.begin(force=True)
    first.commit(batch_rows(IDS[:4]))
    second.commit(batch_rows(IDS[2:]))  # ids 2 and 3 are complete now: only 4 and 5 are new
    first.finish()
    second.finish()
    lake = open_lake(root)
    for name, per_sample in ROWS_PER_SAMPLE.items():
        assert lake.dataset(name).count_rows() == per_sample * len(IDS), name
    runs = lake.arrow("runs").to_pylist()
    assert len(runs) == 1 and runs[0]["n_done"] == len(IDS) and runs[0]["status"] == "complete"


def test_a_stale_heartbeat_of_a_dead_writer_does_not_block_a_resume(tmp_path):
    root = str(tmp_path / "lake")
    child = SPAWN.Process(target=ingest, args=(root, make_run(), IDS[:2]), kwargs={"finish": False})
    child.start()
    child.join(60)
    assert child.exitcode == 0  # it exited without finishing: its heartbeat file is left behind
    assert list((tmp_path / "lake" / "_writers").iterdir())
    done, written = ingest(root, make_run(), IDS)  # its pid is gone: resumes at once
    assert done == set(IDS[:2]) and written == IDS[2:]
    assert not list((tmp_path / "lake" / "_writers").iterdir())  # finish removes its own


def test_lake_check_reports_a_key_stored_twice(tmp_path):
    root = str(tmp_path / "lake")
    ingest(root, make_run(), IDS[:3])
    lake = open_lake(root)
    again = lake.arrow("samples", filter={"sample_id": IDS[1]})
    delta.append(lake.delta("samples"), TABLES["samples"], again)  # what two writers used to leave
    result = CliRunner().invoke(lake_group, ["check", "--lake", root])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("DUPLICATE")]
    assert len(lines) == 1 and "samples" in lines[0] and IDS[1] in lines[0] and "(2 rows)" in lines[0]
    assert "drop-run" in result.output and "run-a" in result.output
    assert os.path.isdir(root)
