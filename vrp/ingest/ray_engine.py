"""The Ray engine: one run split into N shards, each run by a Ray actor holding one model replica.

Why plain Ray actors and not Ray Data ``map_batches``: every shard must go through the lake's
``RunWriter`` (its clean-up of an interrupted attempt, its application transactions, its
samples-last commit order), so the unit of work is a *shard*, not a batch of rows flowing to a
Ray Data sink. Ray Data would route batches to whichever actor is free and needs read tasks
beside the actors (on a 2-CPU cluster, actors holding every slot starve them: ray-project/ray
#44687); explicit actors give each shard one owner, load the model once per actor, and need
nothing but Ray core. A shard is exactly what ``vrp ingest run --shard I/N`` runs, through the
same ``plan_ingest``/``execute_ingest`` functions as the local engine: there is no second pipeline.

Failures: an actor that dies mid-shard is restarted by Ray and its shard re-run (``retries``
times); the re-run resumes like any interrupted shard (its incomplete samples are deleted, its
complete ones skipped), so no row is stored twice. A shard that still fails is reported, the
others finish, and rerunning the same command processes only the missing samples.

Every worker must see the same model files, dataset files and lake: on one machine that is
automatic; on a cluster use a shared filesystem or a lake on object storage (``s3://``).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from vrp.ingest.run import IngestError, IngestOptions, IngestSummary, check_size

#: The hint shown when Ray is missing (the optional extra that installs it).
INSTALL_HINT = "pip install 'vrp[ray]'"

#: Prefix of the workers' Ray actor names (``ray.util.list_named_actors()`` lists them).
ACTOR_PREFIX = "vrp-ingest"


def import_ray() -> Any:
    """The ``ray`` module, or an IngestError naming the extra that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise IngestError(f"--engine ray needs Ray, an optional extra: {INSTALL_HINT}") from exc
    return ray


def worker_name(token: str, index: int, count: int) -> str:
    """The Ray actor name of shard `index` of `count` in one engine call (`token` tells calls apart)."""
    return f"{ACTOR_PREFIX}-{token}-{index + 1}of{count}"


class IngestWorker:
    """The body of one Ray actor: one model replica, loaded once, running shards of a run."""

    def __init__(self, options: IngestOptions, threads: int) -> None:
        import torch

        from vrp.ingest.models import load_adapter

        torch.set_num_threads(threads)
        self.options = options
        self.adapter = load_adapter(
            options.model,
            dtype=options.dtype,
            device=options.device,
            min_pixels=options.min_pixels,
            max_pixels=options.max_pixels,
        )

    def plan(self, shard: tuple[int, int], lake_root: str) -> dict[str, Any]:
        """Plan one shard (reads only): its run row, size and pending count."""
        from vrp.ingest.run import plan_ingest

        plan = plan_ingest(replace(self.options, shard=shard), lake_root, adapter=self.adapter)
        return {
            "run_row": plan.run_row,
            "samples": len(plan.samples),
            "pending": plan.pending,
            "estimated_bytes": plan.estimated_bytes,
            "model": self.adapter.name,
            "num_layers": self.adapter.num_layers,
            "hidden_size": self.adapter.hidden_size,
        }

    def run(self, shard: tuple[int, int], lake_root: str) -> IngestSummary:
        """Ingest one shard; resumes whatever an earlier attempt of this shard left."""
        from vrp.ingest.run import execute_ingest, plan_ingest

        plan = plan_ingest(replace(self.options, shard=shard), lake_root, adapter=self.adapter)
        return execute_ingest(plan, lake_root, echo=lambda _line: None, progress=False)


def _absolute(options: IngestOptions) -> IngestOptions:
    """Paths made absolute: a Ray worker's working directory is not the driver's."""

    def fix(path: str | None) -> str | None:
        return None if path is None else os.path.abspath(path)

    model = os.path.abspath(options.model) if os.path.isdir(options.model) else options.model
    return replace(
        options,
        model=model,
        data_dir=fix(options.data_dir),
        pope_file=fix(options.pope_file),
        image_dir=fix(options.image_dir),
        questions_file=fix(options.questions_file),
        annotations_file=fix(options.annotations_file),
        data_file=fix(options.data_file),
    )


def _merge(run_id: str, model: str, parts: list[IngestSummary], seconds: float) -> IngestSummary:
    task = parts[0].task if parts else None
    total = IngestSummary(run_id=run_id, model=model, total=0, skipped_done=0, seconds=seconds, task=task)
    for part in parts:
        total.total += part.total
        total.skipped_done += part.skipped_done
        total.written += part.written
        total.answers.extend(part.answers)
        total.estimated_bytes += part.estimated_bytes
        total.failures.extend(part.failures)
    return total


def _cause(exc: BaseException) -> str:
    """One line saying why a Ray call failed (the worker's own exception when there is one)."""
    cause = getattr(exc, "cause", None)
    text = str(cause) if cause is not None else str(exc)
    return " ".join(text.split())[:500]


def run_ray_ingest(
    options: IngestOptions,
    lake_root: str,
    *,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    address: str | None = None,
    retries: int = 1,
    echo: Callable[[str], None] = print,
    confirm_bytes: bool = False,
    progress: bool | None = None,
) -> IngestSummary:
    """Ingest one run as `workers` shards on a Ray cluster (started locally unless `address`).

    Each actor asks Ray for `cpus_per_worker` CPUs (fractions allowed) and `gpus_per_worker`
    GPUs; with GPUs the model runs on the one Ray assigns (``cuda``). The run id, rows and
    resume behaviour are those of ``vrp ingest run`` (also with ``--shard I/N``).
    """
    import sys

    from tqdm.auto import tqdm

    from vrp.lake import RunWriter, storage

    ray = import_ray()
    if options.shard != (0, 1):
        raise IngestError("--shard and --engine ray do not combine: the Ray engine makes its own shards")
    if workers < 1:
        raise IngestError("--workers must be at least 1")
    if gpus_per_worker > 0 and options.device == "cpu":
        options = replace(options, device="cuda")
    options = _absolute(options)
    if not storage.is_remote(lake_root):
        lake_root = os.path.abspath(lake_root)

    started = time.monotonic()
    own_cluster = not ray.is_initialized()
    if own_cluster:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    token = uuid.uuid4().hex[:8]
    threads = max(1, int(cpus_per_worker))
    actor_class = ray.remote(IngestWorker)
    actors = [
        actor_class.options(
            name=worker_name(token, i, workers),
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker,
            max_restarts=retries,
            max_task_retries=retries,
        ).remote(options, threads)
        for i in range(workers)
    ]
    try:
        try:
            plans = ray.get([a.plan.remote((i, workers), lake_root) for i, a in enumerate(actors)])
        except ray.exceptions.RayError as exc:
            raise IngestError(f"a Ray worker could not plan its shard: {_cause(exc)}") from exc
        run_ids = {p["run_row"]["run_id"] for p in plans}
        if len(run_ids) != 1:
            raise IngestError(
                f"the workers disagree on the run ({', '.join(sorted(run_ids))}): they see different "
                "model or dataset files; give every machine the same files (a shared filesystem)"
            )
        run_row = plans[0]["run_row"]
        pending = sum(p["pending"] for p in plans)
        estimated = sum(p["estimated_bytes"] for p in plans)
        echo(
            f"run {run_row['run_id']}: {pending} of {sum(p['samples'] for p in plans)} questions to ingest "
            f"with {plans[0]['model']} ({plans[0]['num_layers']} layers, hidden {plans[0]['hidden_size']}) "
            f"on {workers} Ray workers; about {estimated / 2**20:.1f} MiB before compression"
        )
        if not confirm_bytes:
            check_size(estimated, options.max_bytes)

        futures = {a.run.remote((i, workers), lake_root): i for i, a in enumerate(actors)}
        parts: list[IngestSummary] = []
        failed: dict[int, str] = {}
        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(
            total=workers, desc=f"ingest {plans[0]['model']} (ray)", unit="shard", disable=not show
        ) as bar:
            waiting = list(futures)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                for ref in done:
                    try:
                        parts.append(ray.get(ref))
                    except ray.exceptions.RayError as exc:
                        failed[futures[ref]] = _cause(exc)
                    bar.update(1)
        # shards finish at different times, so the runs row gets its final counts once, here
        RunWriter(lake_root, run_row).finish("failed" if failed else "complete")
        summary = _merge(run_row["run_id"], plans[0]["model"], parts, time.monotonic() - started)
        if failed:
            lines = "; ".join(f"shard {i + 1}/{workers}: {why}" for i, why in sorted(failed.items()))
            raise IngestError(
                f"{len(failed)} of {workers} shards failed ({lines}). Committed samples are kept: "
                "rerun the same command to process only the missing ones"
            )
        return summary
    finally:
        for actor in actors:
            ray.kill(actor)
        if own_cluster:
            ray.shutdown()
