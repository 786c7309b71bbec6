"""`--shard I/N` for self-scheduled jobs: N shard runs together equal one unsharded run.

Also the engine options of `vrp ingest run` that need no Ray: the message naming the extra
when Ray is missing, and the options that only make sense with `--engine ray`.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from vrp.cli import main
from vrp.ingest.datasets import load_dataset
from vrp.ingest.run import IngestOptions, run_ingest
from vrp.lake import open_lake
from vrp.schema import TABLES

N_QUESTIONS = 18
COMPARED = ("samples", "layers", "hidden", "generations", "attention_maps", "heads")


@pytest.fixture(scope="module")
def workspace(shapes_workspace, tiny_checkpoint):
    root, data = shapes_workspace("scale", images=5, seed=21)
    return root, data, tiny_checkpoint("llava", root / "tiny-llava", seed=3, num_layers=2)


def _options(model, data, **overrides) -> IngestOptions:
    base = {
        "model": str(model),
        "data_dir": str(data),
        "limit": N_QUESTIONS,
        "batch_size": 4,
        "self_consistency": 2,
        "commit_samples": 4,
    }
    return IngestOptions(**{**base, **overrides})


def sorted_rows(lake, name: str) -> pa.Table:
    """A table's rows in key order, without write-time columns (which differ between writes)."""
    table = lake.arrow(name)
    keep = [c for c in table.column_names if not c.endswith("_at")]
    return table.select(keep).sort_by([(k, "ascending") for k in TABLES[name].key])


def assert_same_rows(left, right, tables=COMPARED) -> None:
    """Same keys and identifiers exactly; float values equal (to float32 rounding)."""
    for name in tables:
        a, b = sorted_rows(left, name), sorted_rows(right, name)
        assert a.num_rows == b.num_rows > 0, name
        for column in a.column_names:
            x, y = a.column(column), b.column(column)
            kind = x.type.value_type if pa.types.is_list(x.type) else x.type
            if pa.types.is_floating(kind):
                xs = np.array(x.to_pylist(), dtype=float)
                ys = np.array(y.to_pylist(), dtype=float)
                np.testing.assert_allclose(xs, ys, rtol=1e-5, atol=1e-6, err_msg=f"{name}.{column}")
            else:
                assert x.to_pylist() == y.to_pylist(), f"{name}.{column}"


def test_three_shards_together_equal_one_unsharded_run(workspace, tmp_path) -> None:
    root, data, model = workspace
    whole = run_ingest(_options(model, data), str(tmp_path / "whole"), echo=lambda _line: None)
    assert whole.written == N_QUESTIONS

    sharded = str(tmp_path / "sharded")
    questions, _ = load_dataset("shapes-pope", data_dir=str(data))
    ids = [q.sample_id for q in questions[:N_QUESTIONS]]
    runner = CliRunner()
    for index in range(3):
        args = ["ingest", "run", "--model", str(model), "--data-dir", str(data), "--limit", str(N_QUESTIONS)]
        args += ["--batch-size", "4", "--self-consistency", "2", "--shard", f"{index + 1}/3"]
        result = runner.invoke(main, [*args, "--lake", sharded])
        assert result.exit_code == 0, result.output
        assert f"{N_QUESTIONS // 3} new samples" in result.output
        # shard I of N owns exactly the questions at positions i with i % N == I - 1
        lake = open_lake(sharded)
        got = {r[0] for r in lake.sql("select sample_id from samples").fetchall()}
        assert got == {sid for i, sid in enumerate(ids) if i % 3 <= index}
        # a shard run again adds nothing
        if index == 0:
            again = runner.invoke(main, [*args, "--lake", sharded])
            assert "0 new samples" in again.output and f"{N_QUESTIONS // 3} already" in again.output

    left, right = open_lake(str(tmp_path / "whole")), open_lake(sharded)
    assert left.sql("select run_id from runs").fetchall() == right.sql("select run_id from runs").fetchall()
    assert right.sql("select status, n_done from runs").fetchall() == [("complete", N_QUESTIONS)]
    assert_same_rows(left, right)


def test_engine_ray_without_ray_names_the_extra(workspace, tmp_path, monkeypatch) -> None:
    root, data, model = workspace
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    args = ["ingest", "run", "--model", str(model), "--data-dir", str(data), "--limit", "2"]
    result = CliRunner().invoke(main, [*args, "--engine", "ray", "--lake", str(tmp_path / "lake")])
    assert result.exit_code != 0
    assert "pip install 'vrp[ray]'" in result.output
    assert not (tmp_path / "lake").exists()


def test_ray_only_options_are_refused_with_the_local_engine(workspace, tmp_path) -> None:
    root, data, model = workspace
    args = ["ingest", "run", "--model", str(model), "--data-dir", str(data), "--lake", str(tmp_path)]
    result = CliRunner().invoke(main, [*args, "--gpus-per-worker", "1"])
    assert result.exit_code == 2 and "--engine ray" in result.output
    result = CliRunner().invoke(main, [*args, "--address", "10.0.0.1:6379"])
    assert result.exit_code == 2 and "--engine ray" in result.output
