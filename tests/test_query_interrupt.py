"""`vrp query` stops when asked: Ctrl-C ends a long statement at once with one line."""

from __future__ import annotations

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


def test_ctrl_c_stops_a_running_query_with_one_line(lake_root):
    command = [
        sys.executable,
        "-c",
        "from vrp.cli import main; main()",
        "query",
        "--lake",
        lake_root,
        ENDLESS,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # imports, then the statement is running (it never ends on its own)
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
