"""Damaged lake files: every reading command ends in the same one-line error, `lake check` points
to `lake repair`, and after the repair the affected samples are captured again by the next ingest.
Damaged Delta logs: named (table and log file), `check` goes on, other tables keep working."""

from __future__ import annotations

import glob
import os
import shutil

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from lake_util import ROWS_PER_SAMPLE, ingest, make_run, sample_ids

from vrp.analysis.synthetic import write_synthetic_lake
from vrp.cli import main
from vrp.lake import open_lake


def _truncate(path: str) -> None:
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])


def _vrp(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def damaged_lake(tmp_path_factory) -> tuple[str, list[str]]:
    root = str(tmp_path_factory.mktemp("synthetic") / "lake")
    write_synthetic_lake(root, n=60, seed=3)
    lake = open_lake(root)
    victims = []
    for name in ("samples", "layers", "hidden"):
        for uri in lake.delta(name).file_uris():
            _truncate(uri)
            victims.append(os.path.basename(uri))
    return root, victims


READING_COMMANDS = [
    ["report", "--out", "{tmp}/report"],
    ["analyze", "correlations", "--n-boot", "20"],
    ["analyze", "margins"],
    ["analyze", "probes"],
    ["lake", "export", "--to", "{tmp}/export"],
    ["lake", "drop-run", "--yes", "{run}"],
    ["query", "SELECT model, avg(p_yes) FROM samples GROUP BY model"],
]


@pytest.mark.parametrize("command", READING_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_reading_command_names_the_damaged_file_on_one_line(damaged_lake, tmp_path, command):
    root, victims = damaged_lake
    run_id = open_lake(root).arrow("runs").column("run_id")[0].as_py()
    args = [a.format(tmp=tmp_path, run=run_id) for a in command]
    result = _vrp(*args[:2], "--lake", root, *args[2:]) if args[0] in ("analyze", "lake") else None
    if result is None:
        result = _vrp(args[0], "--lake", root, *args[1:])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, result.output
    assert "damaged file" in error[0] and "vrp lake check" in error[0]
    assert any(v in error[0] for v in victims), error[0]


def test_check_points_to_repair_and_ingest_recaptures_the_lost_samples(tmp_path):
    root = str(tmp_path / "lake")
    ids = sample_ids(8)
    run = make_run()
    ingest(root, run, ids[:4], batch_size=4)
    ingest(root, run, ids, batch_size=4)  # a second commit: samples 4..7 in their own files
    lake = open_lake(root)
    victim = sorted(lake.delta("hidden").file_uris())[0]
    lost = set(pq.read_table(victim, columns=["sample_id"]).column("sample_id").to_pylist())
    _truncate(victim)

    check = _vrp("lake", "check", "--lake", root)
    assert check.exit_code == 1 and "vrp lake repair" in check.output
    assert sum(line.startswith("DAMAGED hidden") for line in check.output.splitlines()) == 1
    dry = _vrp("lake", "repair", "--lake", root)
    assert dry.exit_code == 0 and "would remove 1 damaged file" in dry.output
    assert _vrp("lake", "check", "--lake", root).exit_code == 1  # a dry run changes nothing
    fixed = _vrp("lake", "repair", "--lake", root, "--yes")
    assert fixed.exit_code == 0, fixed.output
    assert "removed 1 damaged file" in fixed.output
    assert os.path.exists(os.path.join(root, "_quarantine", "hidden"))  # the bytes are kept aside
    after = _vrp("lake", "check", "--lake", root)
    assert after.exit_code == 0, after.output

    lake = open_lake(root)
    complete = set(lake.arrow("samples").column("sample_id").to_pylist())
    assert lost and not (lost & complete)  # their completion rows went with the hidden rows
    done, written = ingest(root, run, ids, batch_size=4)
    assert set(written) >= lost and set(done) | set(written) == set(ids)
    lake = open_lake(root)
    for name, per_sample in ROWS_PER_SAMPLE.items():
        assert lake.dataset(name).count_rows() == per_sample * len(ids), name
    dup = lake.sql("SELECT count(*) - count(DISTINCT (sample_id, layer, site)) FROM hidden").fetchall()
    assert dup == [(0,)]


def _damage_log(table_dir: str, how: str) -> str:
    logs = sorted(glob.glob(os.path.join(table_dir, "_delta_log", "*.json")))
    if how == "garbage-v0":
        with open(logs[0], "w") as fh:
            fh.write("this is not JSON\n")
        return logs[0]
    if how == "deleted-v0":
        os.remove(logs[0])
        return logs[0]
    _truncate(logs[-1])  # truncated-last
    return logs[-1]


@pytest.mark.parametrize("how", ["garbage-v0", "deleted-v0", "truncated-last"])
def test_a_damaged_log_is_named_and_the_other_tables_keep_working(tmp_path, how):
    root = str(tmp_path / "lake")
    ingest(root, make_run(), sample_ids(3), batch_size=1)
    log_file = _damage_log(os.path.join(root, "layers"), how)

    check = _vrp("lake", "check", "--lake", root)
    assert check.exit_code == 1 and isinstance(check.exception, SystemExit)
    damaged = [line for line in check.output.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1 and "layers" in damaged[0] and os.path.basename(log_file) in damaged[0]
    assert "checked" in check.output and "backup" in check.output  # went on, and says what to do

    ok = _vrp("query", "--lake", root, "--format", "csv", "SELECT count(*) AS n FROM samples")
    assert ok.exit_code == 0 and ok.output.splitlines()[1] == "3", ok.output
    bad = _vrp("query", "--lake", root, "SELECT count(*) FROM layers")
    assert bad.exit_code == 1 and isinstance(bad.exception, SystemExit)
    assert "layers" in bad.output and os.path.basename(log_file) in bad.output
    assert _vrp("lake", "info", "--lake", root).exit_code == 0
    from vrp.lake.errors import LakeLogError

    with pytest.raises(LakeLogError, match="layers"):
        ingest(root, make_run(), sample_ids(4), batch_size=1)  # writing it is refused too
    shutil.rmtree(root)
