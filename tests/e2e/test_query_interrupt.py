"""`vrp query` stops when asked: Ctrl-C ends a long statement at once with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from lake_util import ingest, make_run, sample_ids

ENDLESS = "SELECT sum(a.i * b.i) FROM range(100000000) a(i), range(100000000) b(i)"


@pytest.fixture(scope="module")
def lake_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("lake"))
    ingest(root, make_run(), sample_ids(1))
    return root


def test_ctrl_c_stops_a_running_query_with_one_line(lake_root, tmp_path):
    command = [
        sys.executable,
        "-c",
        "from vrp.cli import main; main()",
        "query",
        "--lake",
        lake_root,
        ENDLESS,
    ]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where the query's private temp directory appears
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("vrp-query-*")):  # the statement is about to start
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)  # it is running now (it never ends on its own)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)  # liveness only: without the fix it runs for hours
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("vrp query kept running after Ctrl-C")
    assert proc.returncode == 1, (out, err)
    assert "Traceback" not in err
    assert err.strip().splitlines() == ["Error: query cancelled (Ctrl-C); nothing was written"]


def test_timeout_covers_turning_a_large_result_into_text(lake_root):
    # the statement itself takes milliseconds; rendering 200,000 rows as CSV takes seconds
    from click.testing import CliRunner

    from vrp.lake.commands import query

    sql = "SELECT i, i * 2 AS j FROM range(200000) t(i)"
    args = ["--lake", lake_root, "--timeout", "0.2", "--format", "csv", sql]
    result = CliRunner().invoke(query, args)
    assert result.exit_code == 1, result.output[:200]
    assert "query cancelled after 0.2 s (--timeout)" in result.output
    quick = CliRunner().invoke(
        query, ["--lake", lake_root, "--timeout", "60", "--format", "csv", "SELECT 7 AS n"]
    )
    assert quick.exit_code == 0 and quick.output == "n\n7\n"
