"""What the analyses read from the lake, as numpy arrays aligned by sample (read-only).

Every function takes an open :class:`vrp.lake.Lake` and reads the committed snapshot through it;
per-sample tables come from the named queries in ``vrp/queries`` so the SQL a researcher runs
with ``vrp query --name`` and the numbers in the report are the same computation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from vrp.lake import Lake, to_matrix
from vrp.lake.query import named_query

#: headline metrics: (row label, correlation_inputs column, direction: +1 if larger = more reliable)
HEADLINE_METRICS: tuple[tuple[str, str, int], ...] = (
    ("C_k (cluster count)", "cluster_count", 1),
    ("H_s (spatial entropy)", "spatial_entropy", -1),
    ("token entropy", "token_entropy", -1),
    ("top-1 probability", "top1_prob", 1),
    ("top1-top2 logit margin", "top2_margin", 1),
    ("|yes/no margin|", "abs_yes_no_margin", 1),
    ("answer log-prob", "answer_logprob", 1),
    ("self-consistency", "sc_agreement", 1),
    # the masking detector (high minus full per sample): an answer that loses much when its most
    # attended patches are greyed was grounded in them
    ("mask: entropy rise (high - full)", "mask_entropy_delta", 1),
    ("mask: truth-margin change (high - full)", "mask_truth_margin_delta", -1),
)


def query(lake: Lake, name: str) -> pa.Table:
    """A named query's result on this lake (trusted SQL from the package, so no sandbox needed)."""
    return lake.sql(named_query(name)).to_arrow_table()


def base_runs(lake: Lake, models: Sequence[str] | None = None) -> list[dict]:
    """The `runs` rows of capture runs (not interventions), sorted by model then run id."""
    if not lake.has_table("runs"):
        return []
    rows = [r for r in lake.arrow("runs").to_pylist() if r.get("base_run_id") is None]
    if models:
        rows = [r for r in rows if r["model"] in models]
    return sorted(rows, key=lambda r: (r["model"], r["run_id"]))


@dataclass(frozen=True)
class RunSamples:
    """The scored answers of one run: ids, y (correct) and image ids (the CV groups)."""

    run_id: str
    model: str
    sample_ids: np.ndarray
    y: np.ndarray
    groups: np.ndarray


def scored_samples(lake: Lake, run_id: str) -> RunSamples:
    """Samples of a run with a parsed answer, sorted by sample id.

    An unparsable answer (parse_status "unknown") has no correctness label, whatever ``correct``
    holds, so it is left out of every probe and correlation.
    """
    t = lake.arrow(
        "samples",
        filter={"run_id": run_id},
        columns=["sample_id", "model", "image_id", "correct", "parse_status"],
    )
    scored = (r for r in t.to_pylist() if r["correct"] is not None and r["parse_status"] != "unknown")
    rows = sorted(scored, key=lambda r: r["sample_id"])
    model = rows[0]["model"] if rows else ""
    return RunSamples(
        run_id=run_id,
        model=model,
        sample_ids=np.array([r["sample_id"] for r in rows], dtype=object),
        y=np.array([bool(r["correct"]) for r in rows]),
        groups=np.array([r["image_id"] or r["sample_id"] for r in rows], dtype=object),
    )


def hidden_layers(lake: Lake, run_id: str, site: str) -> list[int]:
    """Layers of a run that have hidden states at ``site``, ascending."""
    t = lake.arrow("hidden", filter={"run_id": run_id, "site": site}, columns=["layer"])
    return sorted({int(v) for v in t.column("layer").to_pylist()})


def hidden_loader(lake: Lake, run_id: str, site: str, sample_ids: np.ndarray) -> Callable[[int], np.ndarray]:
    """``load(layer)`` -> samples x hidden matrix, rows in the order of ``sample_ids``.

    Raises ValueError naming the run, site and layer when a sample has no stored state.
    """
    position = {s: i for i, s in enumerate(sample_ids)}

    def load(layer: int) -> np.ndarray:
        t = lake.arrow(
            "hidden", filter={"run_id": run_id, "site": site, "layer": int(layer)}, columns=["sample_id", "h"]
        )
        ids = t.column("sample_id").to_pylist()
        keep = [i for i, s in enumerate(ids) if s in position]
        if len(keep) != len(position):
            raise ValueError(
                f"run {run_id}: {len(position) - len(keep)} scored samples have no hidden state "
                f"at site {site!r}, layer {layer}"
            )
        mat = to_matrix(t.column("h").take(pa.array(keep)))
        order = np.argsort([position[ids[i]] for i in keep])
        return mat[order]

    return load


def layer_matrix(
    lake: Lake, run_id: str, column: str, sample_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(layers, samples x layers matrix) of one `layers` column; NaN where a value is missing."""
    t = lake.arrow("layers", filter={"run_id": run_id}, columns=["sample_id", "layer", column])
    position = {s: i for i, s in enumerate(sample_ids)}
    layers = np.array(sorted({int(v) for v in t.column("layer").to_pylist()}), dtype=int)
    col = {v: j for j, v in enumerate(layers)}
    out = np.full((len(sample_ids), len(layers)), np.nan)
    for sid, layer, value in zip(
        t.column("sample_id").to_pylist(),
        t.column("layer").to_pylist(),
        t.column(column).to_pylist(),
        strict=True,
    ):
        i = position.get(sid)
        if i is not None and value is not None:
            out[i, col[int(layer)]] = value
    return layers, out
