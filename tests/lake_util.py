"""Shared helpers of the lake tests: tiny deterministic runs and batches, and spawn-able writers.

The per-sample row counts are fixed by the constants below, so tests can state the exact
number of rows a complete run must hold in every table.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

import numpy as np

HIDDEN = 8
LAYERS = 2
HEADS = 2
SITES = ("resid", "mlp_out")
GRID = (2, 3)

#: rows per complete sample in each table written by `batch_rows`
ROWS_PER_SAMPLE = {
    "layers": LAYERS,
    "heads": LAYERS * HEADS,
    "attention_maps": LAYERS,
    "hidden": LAYERS * len(SITES),
    "samples": 1,
}


def make_run(
    run_id: str = "run-a", model: str = "toy-llava", *, hidden_size: int = HIDDEN, **extra: Any
) -> dict:
    """A `runs` row as the ingest engine would pass it."""
    run = {
        "run_id": run_id,
        "model": model,
        "model_source": "tests/tiny",
        "model_revision": "rev-1",
        "family": "llava",
        "dataset": "shapes-pope",
        "split": "random",
        "dtype": "float32",
        "device": "cpu",
        "attention_backend": "sdpa",
        "code_version": "test-1",
        "config": {"hidden_size": hidden_size, "seed": 0},
    }
    run.update(extra)
    return run


def sample_ids(n: int, prefix: str = "s") -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(n)]


def _seed(sample_id: str) -> int:
    return int.from_bytes(sample_id.encode()[-4:].rjust(4, b"\0"), "little")


def batch_rows(ids: Sequence[str], *, hidden_size: int = HIDDEN, tables: Sequence[str] | None = None) -> dict:
    """One batch group for `ids`: deterministic values derived from each sample id."""
    out: dict[str, list[dict]] = {name: [] for name in ROWS_PER_SAMPLE}
    gh, gw = GRID
    for sid in ids:
        rng = np.random.default_rng(_seed(sid))
        for layer in range(LAYERS):
            out["layers"].append({"sample_id": sid, "layer": layer, "image_mass": float(rng.random())})
            for head in range(HEADS):
                out["heads"].append(
                    {"sample_id": sid, "layer": layer, "head": head, "spatial_entropy": float(rng.random())}
                )
            cells = rng.random(gh * gw).astype(np.float32)
            out["attention_maps"].append(
                {"sample_id": sid, "layer": layer, "grid_h": gh, "grid_w": gw, "map": cells / cells.sum()}
            )
            for site in SITES:
                h = rng.standard_normal(hidden_size).astype(np.float32)
                out["hidden"].append({"sample_id": sid, "layer": layer, "site": site, "h": h})
        out["samples"].append(
            {"sample_id": sid, "label": "yes", "answer": "yes", "correct": True, "p_yes": float(rng.random())}
        )
    if tables is not None:
        out = {name: rows for name, rows in out.items() if name in tables}
    return out


def chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def ingest(
    root: str,
    run: dict,
    ids: Sequence[str],
    *,
    batch_size: int = 2,
    shard: tuple[int, int] = (0, 1),
    owned: Sequence[str] | None = None,
    stop_after_batches: int | None = None,
    finish: bool = True,
) -> tuple[set[str], list[str]]:
    """Write `ids` the way the ingest engine does: begin, skip completed, commit batches, finish.

    Returns (samples already complete at begin, samples written now).
    """
    from vrp.lake import open_lake

    writer = open_lake(root).writer(run, shard=shard, owned_sample_ids=owned)
    done = writer.begin()
    todo = [s for s in ids if s not in done]
    written: list[str] = []
    for i, batch in enumerate(chunks(todo, batch_size)):
        if stop_after_batches is not None and i >= stop_after_batches:
            return done, written
        writer.commit(batch_rows(batch, hidden_size=run["config"]["hidden_size"]))
        written.extend(batch)
    if finish:
        writer.finish()
    return done, written


def _die_before_samples(after_commits: int) -> None:
    """Fault injection in a child process: SIGKILL itself right before the `samples` append of
    its (after_commits + 1)-th batch, i.e. after that batch's other tables are committed."""
    from vrp.lake import delta

    real_append = delta.append
    seen = {"samples": 0}

    def append(dt, spec, data, **kwargs):  # noqa: ANN001, ANN202 - same signature as delta.append
        if spec.name == "samples":
            if seen["samples"] == after_commits:
                os.kill(os.getpid(), signal.SIGKILL)
            seen["samples"] += 1
        return real_append(dt, spec, data, **kwargs)

    delta.append = append


def child_ingest(
    root: str,
    run: dict,
    ids: Sequence[str],
    batch_size: int = 2,
    shard: tuple[int, int] = (0, 1),
    owned: Sequence[str] | None = None,
    die_before_samples_of_batch: int | None = None,
) -> None:
    """Entry point of a spawned writer process (see `ingest`)."""
    if die_before_samples_of_batch is not None:
        _die_before_samples(die_before_samples_of_batch)
    ingest(root, run, ids, batch_size=batch_size, shard=shard, owned=owned)


def child_big_commit(root: str, run: dict, ids: Sequence[str], layers: int) -> None:
    """A spawned writer committing one large batch of `hidden` rows (many partitions), so that a
    SIGKILL from the parent lands while its data files are being written."""
    from vrp.lake import open_lake

    writer = open_lake(root).writer(run)
    writer.begin()
    rng = np.random.default_rng(0)
    hidden = [
        {"sample_id": sid, "layer": layer, "site": site, "h": rng.standard_normal(HIDDEN).astype(np.float32)}
        for sid in ids
        for layer in range(layers)
        for site in SITES
    ]
    writer.commit({"hidden": hidden, "samples": [{"sample_id": sid} for sid in ids]})


def two_model_lake(root: str, n_a: int, n_b: int) -> str:
    """A lake holding run-a (toy-llava, `n_a` samples) and run-b (toy-qwen, `n_b`), written as ingest does."""
    ingest(root, make_run("run-a"), sample_ids(n_a))
    ingest(root, make_run("run-b", model="toy-qwen"), sample_ids(n_b))
    return root


def probe_neuron_rows(
    run_id: str, model: str, layer: int, hidden: int
) -> tuple[list[dict], list[int], list[int]]:
    """A fixed L1 (8 neurons) and L2 (all) ranking of one layer, as `vrp analyze probes` writes them.

    Returns the `probe_neurons` rows and the two orders (L1, L2) they encode.
    """
    rng = np.random.default_rng(7)
    l1 = [int(c) for c in rng.choice(hidden, size=8, replace=False)]
    l2 = [int(c) for c in rng.permutation(hidden)]
    rows = [
        {
            "run_id": run_id,
            "model": model,
            "site": "mlp_out",
            "layer": layer,
            "method": method,
            "neuron": neuron,
            "coef": float(len(order) - rank),
            "rank": rank + 1,
        }
        for method, order in (("l1", l1), ("l2", l2))
        for rank, neuron in enumerate(order)
    ]
    return rows, l1, l2
