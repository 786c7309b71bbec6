"""Write a static per-sample viewer of the lake: an index page and one page per sample.

Usage::

    summary = write_view(open_lake("vrp-lake"), "vrp-view", where="correct = false", limit=500)
    # open vrp-view/index.html in a browser (file:// is enough)

Layout of the output folder (nothing is fetched from anywhere else)::

    index.html            the sortable, filterable table of samples
    s/<key>.html          one small page per sample (static HTML, no lake text in it)
    data/index.js         the index rows, loaded by index.html
    data/s/<key>.js       one sample's maps, curves, answers and interventions, loaded by its page
    img/<name>.png        each picture once, as the model saw it (from the lake's `images` table)
    view.js, view.css     the viewer itself

Why data sits in ``.js`` files: a page opened from ``file://`` may not ``fetch()`` files beside it,
but it may load scripts, so each data file is one call ``VRP.index({...})`` / ``VRP.sample({...})``
with a JSON argument. Pages load only their own data (lazily), so a view of 10,000 samples opens
as fast as one of ten. Lake text is never written into HTML: the pages carry only hex keys, and
view.js puts every string into the page with ``textContent`` (a shared lake can come from anyone).

Maps are stored quantised to 8 bits per cell with each layer's minimum and maximum (a heatmap
needs no more), base64-encoded: a LLaVA sample's 32 layers x 576 cells x 2 maps take ~50 KB.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vrp.lake.errors import LakeError
from vrp.lake.images import load_images
from vrp.lake.lake import Lake
from vrp.lake.query import check_query, one_line

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"

#: Columns of `samples` the index and the pages show (absent ones, in an older lake, are null).
SAMPLE_COLUMNS = (
    "run_id",
    "sample_id",
    "model",
    "family",
    "dataset",
    "split",
    "category",
    "question_id",
    "image_id",
    "question",
    "object",
    "label",
    "answer_text",
    "answer",
    "parse_status",
    "correct",
    "p_yes",
    "p_no",
    "yes_no_margin",
    "top1_prob",
    "top2_margin",
    "token_entropy",
    "answer_logprob",
    "sc_agreement",
    "sc_answer",
    "sc_k",
    "n_image_tokens",
    "grid_h",
    "grid_w",
    "spatial_entropy",
    "cluster_count",
    "image_hash",
)


class ViewError(LakeError):
    """A view that cannot be written; the message says what to do."""


@dataclass
class ViewSummary:
    """What a view holds, for the terminal line and for tests."""

    out: Path
    samples: int
    images: int
    missing_images: int
    conditions: list[str]
    interventions: int
    bytes: int

    def line(self) -> str:
        size = f"{self.bytes / 2**20:.1f} MiB"
        parts = [f"view of {self.samples} samples written to {self.out / 'index.html'} ({size})"]
        if self.missing_images:
            parts.append(
                f"{self.missing_images} samples have no picture in the lake (ingested before the images "
                "table existed; re-ingest to add them)"
            )
        if self.conditions:
            parts.append(f"conditions: {', '.join(self.conditions)}")
        if self.interventions:
            parts.append(f"{self.interventions} intervention rows")
        return "; ".join(parts)


def page_key(run_id: str, sample_id: str) -> str:
    """The file name of a sample's page and data: a hex hash, so lake text never names a file."""
    return hashlib.sha256(f"{run_id}/{sample_id}".encode()).hexdigest()[:20]


def page_path(run_id: str, sample_id: str) -> str:
    """A sample's page relative to the view folder (``vrp report --view`` links to it)."""
    return f"s/{page_key(run_id, sample_id)}.html"


def _image_name(image_hash: str) -> str:
    return hashlib.sha256(image_hash.encode()).hexdigest()[:24] + ".png"


def _sql(name: str) -> str:
    return (HERE / f"{name}.sql").read_text(encoding="utf-8")


def select_samples(
    lake: Lake,
    *,
    run: str | None = None,
    model: str | None = None,
    where: str | None = None,
    limit: int | None = None,
) -> pa.Table:
    """The samples to show. ``where`` is user SQL: checked and run read-only like `vrp query`."""
    sql = _sql("samples")
    if where:
        sql = f"SELECT * FROM ({sql}) AS v WHERE ({where})"
    sql = f"SELECT * FROM ({sql}) AS w ORDER BY model, run_id, dataset, split, question_id, sample_id"
    params: dict[str, Any] = {"run": run, "model": model}
    if limit is not None:
        sql += " LIMIT $limit"
        params["limit"] = int(limit)
    check_query(sql)
    with tempfile.TemporaryDirectory(prefix="vrp-view-") as scratch:  # the locked connection's own temp dir
        con = lake.connect(safe=True, temp_directory=scratch)
        try:
            return con.sql(sql, params=params).to_arrow_table()
        except Exception as exc:  # noqa: BLE001 - DuckDB's errors come in several classes; one line for the user
            raise ViewError(f"--where/--run/--model selection failed: {one_line(str(exc))}") from exc
        finally:
            con.close()


def _rows(table: pa.Table, columns: Sequence[str]) -> list[dict[str, Any]]:
    present = [c for c in columns if c in table.column_names]
    rows = table.select(present).to_pylist()
    for row in rows:
        for column in columns:
            row.setdefault(column, None)
    return rows


def _finite(value: Any, digits: int | None = None) -> Any:
    """JSON-safe: NaN/inf become null; ``digits`` rounds (a page shows 3 decimals, so 5 are plenty)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if digits is not None:
            return round(value, digits)
    return value


def _read(lake: Lake, name: str, runs: Iterable[str], samples: Iterable[str], columns: list[str]) -> pa.Table:
    if not lake.has_table(name):
        return pa.table({c: [] for c in columns})
    schema_names = lake.dataset(name).schema.names
    expr = pc.field("run_id").isin(sorted(set(runs))) & pc.field("sample_id").isin(sorted(set(samples)))
    return lake.arrow(name, expr, columns=[c for c in columns if c in schema_names])


def _quantise(values: np.ndarray) -> dict[str, Any]:
    """One map as 8-bit cells with its range: {"lo", "hi", "q" (base64 bytes)}."""
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo
    q = (
        np.zeros(values.shape, dtype=np.uint8)
        if span <= 0
        else np.rint((values - lo) / span * 255).astype(np.uint8)
    )
    return {"lo": lo, "hi": hi, "q": base64.b64encode(q.tobytes()).decode("ascii")}


def _maps_by_sample(
    table: pa.Table, grids: dict[tuple[str, str], tuple[int, int]]
) -> dict[tuple[str, str], dict[int, np.ndarray]]:
    """(run_id, sample_id) -> layer -> map, reading the vector column without a Python list per cell.

    Also records each sample's grid in ``grids`` (the map rows carry it, whatever `samples` says).
    Only the maps over the whole image are drawn: ``tile`` -1, or null in rows older than the
    column; an image seen as several grids has its per-grid rows too (docs/ARCHITECTURE.md 4.1b).
    """
    out: dict[tuple[str, str], dict[int, np.ndarray]] = defaultdict(dict)
    if "tile" in table.column_names:
        table = table.filter(pc.equal(pc.fill_null(table.column("tile"), -1), -1))
        table = table.drop_columns(["tile"])
    if table.num_rows == 0:
        return out
    for run, sample, gh, gw in zip(
        *(table.column(c).to_pylist() for c in ("run_id", "sample_id", "grid_h", "grid_w")), strict=True
    ):
        grids[(run, sample)] = (int(gh), int(gw))
    column = table.column("map").combine_chunks()
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    offsets = column.offsets.to_numpy()
    runs = table.column("run_id").to_pylist()
    samples = table.column("sample_id").to_pylist()
    layers = table.column("layer").to_pylist()
    for i, (run, sample, layer) in enumerate(zip(runs, samples, layers, strict=True)):
        out[(run, sample)][int(layer)] = flat[offsets[i] : offsets[i + 1]]
    return out


def _map_block(maps: dict[int, np.ndarray], *, renormalise: bool) -> dict[str, Any] | None:
    if not maps:
        return None
    layers = sorted(maps)
    stacked = np.stack([maps[layer] for layer in layers]).astype(np.float64)
    mean = stacked.mean(0)
    if renormalise and mean.sum() > 0:  # the paper's aggregate attention map: the layer mean, renormalised
        mean = mean / mean.sum()
    return {"layers": layers, "maps": [_quantise(maps[layer]) for layer in layers], "mean": _quantise(mean)}


def _cells(detail: str | None) -> list[int] | None:
    try:
        value = json.loads(detail or "null")
    except json.JSONDecodeError:
        return None
    patches = value.get("patches") if isinstance(value, dict) else None
    if isinstance(patches, list) and all(isinstance(c, int) for c in patches):
        return patches
    return None


def _js(call: str, payload: Any) -> str:
    """`VRP.<call>(<json>);`, plain ASCII, with ``<``, ``>`` and ``&`` escaped as well.

    The escapes keep markup out of the file entirely, so even a page that inlined it could not
    be closed by a ``</script>`` in the lake's text.
    """
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"), allow_nan=False, default=str)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"VRP.{call}({text});\n"


def _p_answer(row: dict[str, Any]) -> float | None:
    """The probability of the answer given: p_yes / p_no of a yes/no run, else its first token's.

    An open-answer run can answer "yes" too (VQAv2's "is there a ..." questions); it has no
    p_yes / p_no, so the first token's probability stands in, as for every other open answer.
    """
    by_answer = {"yes": row.get("p_yes"), "no": row.get("p_no")}.get(row.get("answer"))
    return by_answer if by_answer is not None else row.get("top1_prob")


def _page_html(title: str, page: str, prefix: str, key: str = "") -> str:
    # No lake text here: the title is fixed, the key is hex (page_key).
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "script-src 'self'; style-src 'self'; img-src 'self' data:\">"
        f'<title>{title}</title><link rel="stylesheet" href="{prefix}view.css"></head>'
        f'<body data-page="{page}" data-key="{key}" data-root="{prefix}">'
        '<main id="app"><p class="loading">loading...</p></main>'
        f'<script src="{prefix}view.js"></script></body></html>\n'
    )


def write_view(
    lake: Lake,
    out: str | os.PathLike[str],
    *,
    run: str | None = None,
    model: str | None = None,
    where: str | None = None,
    limit: int | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> ViewSummary:
    """Write the viewer for the selected samples into ``out`` (its previous view is replaced)."""
    out = Path(out)
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / "data" / "index.js").is_file())
    ):
        raise ViewError(
            f"{out} exists and is not a VRP view; give --out a new or empty folder (it is replaced)"
        )
    selected = select_samples(lake, run=run, model=model, where=where, limit=limit)
    if selected.num_rows == 0:
        raise ViewError(
            "no samples match (the lake has no image runs, or --run/--model/--where exclude all); "
            'see `vrp query "select run_id, model, kind, n_done from runs"`'
        )
    rows = _rows(selected, SAMPLE_COLUMNS)
    grids = (
        selected.column("n_grids").to_pylist() if "n_grids" in selected.column_names else [None] * len(rows)
    )
    several_grids = {(r["run_id"], r["sample_id"]): (n or 1) > 1 for r, n in zip(rows, grids, strict=True)}
    runs = sorted({r["run_id"] for r in rows})
    ids = sorted({r["sample_id"] for r in rows})

    layers = _read(
        lake, "layers", runs, ids, ["run_id", "sample_id", "layer", "lens_truth_margin", "lens_yes_no_margin"]
    )
    lens: dict[tuple[str, str], list[tuple[int, Any, Any]]] = defaultdict(list)
    for r in layers.to_pylist():
        lens[(r["run_id"], r["sample_id"])].append(
            (r["layer"], r["lens_truth_margin"], r["lens_yes_no_margin"])
        )
    heads: dict[tuple[str, str], dict[int, list[list[Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in _read(
        lake, "heads", runs, ids, ["run_id", "sample_id", "layer", "head", "image_mass", "spatial_entropy"]
    ).to_pylist():
        heads[(r["run_id"], r["sample_id"])][r["layer"]].append(
            [r["head"], _finite(r["image_mass"], 5), _finite(r["spatial_entropy"], 5)]
        )
    map_columns = ["run_id", "sample_id", "layer", "tile", "grid_h", "grid_w", "map"]
    grids: dict[tuple[str, str], tuple[int, int]] = {}
    attention = _maps_by_sample(_read(lake, "attention_maps", runs, ids, map_columns), grids)
    evidence = _maps_by_sample(_read(lake, "evidence_maps", runs, ids, map_columns), grids)
    generations: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in _read(
        lake, "generations", runs, ids, ["run_id", "sample_id", "k", "text", "answer", "correct"]
    ).to_pylist():
        generations[(r["run_id"], r["sample_id"])].append(r)

    # conditions: runs whose base is a viewed run and which wrote samples rows
    conditions: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    condition_runs: dict[str, tuple[str, str]] = {}
    names: set[str] = set()
    cond_rows = lake.sql(_sql("conditions")).fetchall()
    for run_id, kind, base in cond_rows:
        if base in runs:
            condition_runs[run_id] = (kind, base)
    if condition_runs:
        cond_samples = _read(
            lake,
            "samples",
            condition_runs,
            ids,
            ["run_id", "sample_id", "answer", "answer_text", "correct", "p_yes", "p_no", "top1_prob"],
        )
        cond_layers = _read(
            lake, "layers", condition_runs, ids, ["run_id", "sample_id", "layer", "lens_truth_margin"]
        )
        cond_lens: dict[tuple[str, str], list[tuple[int, Any]]] = defaultdict(list)
        for r in cond_layers.to_pylist():
            cond_lens[(r["run_id"], r["sample_id"])].append((r["layer"], _finite(r["lens_truth_margin"])))
        for r in cond_samples.to_pylist():
            kind, base = condition_runs[r["run_id"]]
            names.add(kind)
            curve = sorted(cond_lens.get((r["run_id"], r["sample_id"]), []))
            conditions[(base, r["sample_id"])].append(
                {
                    "name": kind,
                    "answer": r["answer"],
                    "answer_text": r["answer_text"],
                    "correct": r["correct"],
                    "p_answer": _finite(_p_answer(r)),
                    "lens_layers": [c[0] for c in curve],
                    "lens_truth_margin": [c[1] for c in curve],
                }
            )

    interventions: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    n_interventions = 0
    if lake.has_table("interventions"):
        table = lake.arrow(
            "interventions",
            pc.field("base_run_id").isin(runs) & pc.field("sample_id").isin(ids),
            columns=[
                "base_run_id",
                "sample_id",
                "kind",
                "condition",
                "level",
                "setting",
                "detail",
                "answer",
                "correct",
                "yes_no_margin",
                "p_yes",
            ],
        )
        for r in table.to_pylist():
            n_interventions += 1
            # a multi-grid image's masked cells lie in its grids, not on the stitched lattice drawn here
            # (docs/ARCHITECTURE.md section 4.1b), so only a single-grid image's patches are outlined
            multi = several_grids.get((r["base_run_id"], r["sample_id"]), False)
            interventions[(r["base_run_id"], r["sample_id"])].append(
                {
                    "kind": r["kind"],
                    "condition": r["condition"],
                    "level": _finite(r["level"]),
                    "setting": r["setting"],
                    "answer": r["answer"],
                    "correct": r["correct"],
                    "yes_no_margin": _finite(r["yes_no_margin"]),
                    "p_yes": _finite(r["p_yes"]),
                    "cells": None if multi else _cells(r["detail"]),
                }
            )

    pictures = load_images(lake, [r["image_hash"] for r in rows if r.get("image_hash")])

    # ---- write: into a fresh temporary folder, then swap it in, so a failed write leaves the old view
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "data" / "s").mkdir(parents=True)
    (staging / "s").mkdir()
    (staging / "img").mkdir()
    for asset in ("view.js", "view.css"):
        shutil.copyfile(ASSETS / asset, staging / asset)
    (staging / "index.html").write_text(_page_html("VRP view", "index", ""), encoding="utf-8")

    written_images: set[str] = set()
    index_rows = []
    missing = 0
    iterator: Iterable[dict[str, Any]] = progress(rows) if progress else rows
    for row in iterator:
        ident = (row["run_id"], row["sample_id"])
        key = page_key(*ident)
        image = None
        hash_ = row.get("image_hash")
        if hash_ and hash_ in pictures:
            name = _image_name(hash_)
            if name not in written_images:
                (staging / "img" / name).write_bytes(pictures[hash_])
                written_images.add(name)
            image = f"../img/{name}"
        else:
            missing += 1
        curve = sorted(lens.get(ident, []))
        conds = conditions.get(ident, [])
        meta = {c: _finite(row.get(c)) for c in SAMPLE_COLUMNS if c != "image_hash"}
        meta["p_answer"] = _finite(_p_answer(row))
        final_margin = curve[-1][1] if curve else None
        dependence = {}
        for c in conds:
            if final_margin is not None and c["lens_truth_margin"] and c["lens_truth_margin"][-1] is not None:
                dependence[c["name"]] = final_margin - c["lens_truth_margin"][-1]
        payload = {
            "key": key,
            "meta": meta,
            "image": image,
            "grid": list(grids.get(ident, (row.get("grid_h"), row.get("grid_w")))),
            "attention": _map_block(attention.get(ident, {}), renormalise=True),
            "evidence": _map_block(evidence.get(ident, {}), renormalise=False),
            "lens": {
                "layers": [c[0] for c in curve],
                "truth_margin": [_finite(c[1], 5) for c in curve],
                "yes_no_margin": [_finite(c[2], 5) for c in curve],
            },
            "heads": {str(layer): sorted(v) for layer, v in heads.get(ident, {}).items()},
            "generations": [
                {"k": g["k"], "text": g["text"], "answer": g["answer"], "correct": g["correct"]}
                for g in sorted(generations.get(ident, []), key=lambda g: g["k"])
            ],
            "conditions": conds,
            "visual_dependence": dependence,
            "interventions": sorted(
                interventions.get(ident, []),
                key=lambda r: (r["kind"] or "", r["condition"] or "", r["level"] or 0),
            ),
        }
        (staging / "data" / "s" / f"{key}.js").write_text(_js("sample", payload), encoding="ascii")
        (staging / "s" / f"{key}.html").write_text(
            _page_html("VRP sample", "sample", "../", key), encoding="utf-8"
        )
        index_rows.append(
            {
                "key": key,
                "model": row["model"],
                "dataset": row["dataset"],
                "split": row["split"],
                "category": row.get("category"),
                "question": row["question"],
                "answer": row["answer"] if row["answer"] is not None else row["answer_text"],
                "label": row["label"],
                "correct": row["correct"],
                "p": meta["p_answer"],
                "sc": _finite(row.get("sc_agreement")),
                "dependence": dependence or None,
                "changes": {c["name"]: c["answer"] for c in conds if c["answer"] != row["answer"]} or None,
                "image": image is not None,
            }
        )
    index = {
        "rows": index_rows,
        "conditions": sorted(names),
        "missing_images": missing,
        "lake": str(lake.root),
    }
    (staging / "data" / "index.js").write_text(_js("index", index), encoding="ascii")
    size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    if out.exists():
        retired = out.with_name(out.name + ".old")
        if retired.exists():
            shutil.rmtree(retired)
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired)
    else:
        staging.rename(out)
    return ViewSummary(
        out=out,
        samples=len(rows),
        images=len(written_images),
        missing_images=missing,
        conditions=sorted(names),
        interventions=n_interventions,
        bytes=size,
    )
