"""The Ray engine on a single-node cluster of 2 CPUs started by the test, in a spawned process.

One child process (spawned: delta-rs panics after fork) starts Ray once and makes two engine
calls on a tiny model over 24 questions. In the first, the second worker actor is killed
mid-shard without restart: its shard fails and the call says to rerun. In the rerun, the same
worker is killed mid-shard again, this time with restart: Ray restarts the actor and retries
the shard, which resumes. The parent checks that no key is stored twice and that the lake
holds the same rows as a local-engine run of the same questions.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time

import pytest
import torch
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError
from test_scale import assert_same_rows

from vrp.ingest.datasets import generate_shapes_pope, load_dataset
from vrp.ingest.models.tiny import build_tiny
from vrp.ingest.run import IngestOptions, run_ingest
from vrp.lake import open_lake
from vrp.schema import TABLES

pytest.importorskip("ray", reason="the Ray engine is an optional extra: pip install 'vrp[ray]'")

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")
N_QUESTIONS = 24
WORKERS = 2


def _options(model: str, data: str, **overrides) -> IngestOptions:
    base = {
        "model": model,
        "data_dir": data,
        "limit": N_QUESTIONS,
        "batch_size": 2,
        "self_consistency": 2,
        "commit_samples": 2,
    }
    return IngestOptions(**{**base, **overrides})


def _committed(lake_root: str, ids: set[str]) -> int:
    """How many of `ids` have a committed samples row (a light read: polled while workers write)."""
    try:
        dt = DeltaTable(os.path.join(lake_root, "samples"))
    except TableNotFoundError:
        return 0
    return len(set(dt.to_pyarrow_dataset().to_table(columns=["sample_id"]).column(0).to_pylist()) & ids)


def _call_and_kill(ray, run, lake_root: str, shard_ids: set[str], *, floor: int, restart: bool) -> dict:
    """Run the engine in a thread; kill worker 2 once its shard has more than `floor` but not all
    of its samples committed. Return when it was killed and how the call ended."""
    from vrp.ingest.ray_engine import ACTOR_PREFIX
    from vrp.ingest.run import IngestError

    outcome: dict = {"error": None}

    def call() -> None:
        try:
            summary = run()
            outcome.update(written=summary.written, skipped=summary.skipped_done)
        except IngestError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=call)
    thread.start()
    outcome["at_kill"] = None
    while thread.is_alive():
        n = _committed(lake_root, shard_ids)
        if floor < n < len(shard_ids):
            names = [x for x in ray.util.list_named_actors() if x.startswith(ACTOR_PREFIX)]
            ray.kill(ray.get_actor(next(x for x in names if x.endswith("2of2"))), no_restart=not restart)
            outcome["at_kill"] = n
            break
        time.sleep(0.02)
    thread.join()
    outcome["after"] = _committed(lake_root, shard_ids)
    return outcome


def ray_child(model: str, data: str, lake_root: str, report: str) -> None:
    """Start Ray (2 CPUs), make the two engine calls, write what happened to `report` (JSON)."""
    import ray

    from vrp.ingest.ray_engine import run_ray_ingest

    torch.set_num_threads(1)
    for attempt in range(2):  # Ray gives its node 30 s to register: a busy machine may need a retry
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            break
        except Exception:
            ray.shutdown()
            if attempt:
                raise
    questions, _ = load_dataset("shapes-pope", data_dir=data)
    shard_ids = {q.sample_id for i, q in enumerate(questions[:N_QUESTIONS]) if i % WORKERS == 1}
    engine = {"workers": WORKERS, "cpus_per_worker": 0.5, "echo": lambda _line: None, "progress": False}

    def run():
        return run_ray_ingest(_options(model, data), lake_root, **engine)

    first = _call_and_kill(ray, run, lake_root, shard_ids, floor=0, restart=False)
    second = _call_and_kill(ray, run, lake_root, shard_ids, floor=first["after"], restart=True)
    ray.shutdown()
    with open(report, "w", encoding="utf-8") as fh:
        json.dump({"first": first, "second": second, "shard_size": len(shard_ids)}, fh)


def _duplicates(lake, name: str) -> int:
    key = ", ".join(TABLES[name].key)
    return lake.sql(
        f"SELECT count(*) FROM (SELECT {key} FROM {name} GROUP BY ALL HAVING count(*) > 1)"
    ).fetchall()[0][0]


def test_killed_ray_workers_resume_and_the_lake_equals_a_local_run(tmp_path) -> None:
    torch.set_num_threads(1)
    data = str(generate_shapes_pope(tmp_path / "shapes", images=6, seed=11))
    model = str(build_tiny("llava", tmp_path / "tiny-llava", seed=0, num_layers=2))
    local = str(tmp_path / "local")
    run_ingest(_options(model, data, batch_size=4, commit_samples=8), local, echo=lambda _line: None)

    report, lake_root = str(tmp_path / "report.json"), str(tmp_path / "ray")
    child = SPAWN.Process(target=ray_child, args=(model, data, lake_root, report))
    child.start()
    child.join(600)
    if child.is_alive():
        child.kill()
        raise AssertionError("the Ray child process hung")
    assert child.exitcode == 0
    with open(report, encoding="utf-8") as fh:
        events = json.load(fh)
    first, second, size = events["first"], events["second"], events["shard_size"]
    half = N_QUESTIONS // WORKERS

    # killed without restart: shard 2 stops part-way, shard 1 completes, the call says to rerun
    assert first["at_kill"] is not None, "worker 2 finished before it could be killed"
    assert first["after"] < size
    assert "1 of 2 shards failed" in first["error"] and "shard 2/2" in first["error"]
    assert "rerun the same command" in first["error"]

    # killed again with restart: Ray retries the shard, which resumes above what was committed
    assert second["error"] is None, second["error"]
    assert second["at_kill"] is not None and first["after"] < second["at_kill"] < size
    assert second["skipped"] >= half + second["at_kill"]
    assert second["written"] == N_QUESTIONS - second["skipped"]

    lake = open_lake(lake_root)
    for name in ("samples", "layers", "heads", "attention_maps", "hidden", "generations"):
        assert _duplicates(lake, name) == 0, name
    assert_same_rows(open_lake(local), lake)
    assert lake.sql("select status, n_done, n_failed from runs").fetchall() == [("complete", N_QUESTIONS, 0)]
