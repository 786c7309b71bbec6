"""Intervention effects: paired accuracy changes and the destruction curve (pure; no torch, no model).

What this module offers:

* :func:`intervention_deltas` - per intervention run, condition and level: accuracy against the
  paired reference (the run's own ``full`` condition, else the base run's answers), the change with
  a paired bootstrap CI and McNemar's exact p, and the mean first-token margin (yes/no margin
  for yes/no answers, truth margin for open ones); overall and, with ``by=``, per question type
  (``split``, ``category``, VQA's ``question_type``/``answer_type``, or a ``type_tag``).
* :func:`deltas_from_lake` - the same, reading ``interventions`` and the base runs' ``samples``.
* :func:`destruction_curve_figure` - accuracy and margin against the destroyed fraction, one line
  per model and order, written with matplotlib's Agg canvas (no display, no global backend change).

Why paired: every condition answers the very same questions as its reference, so the question
difficulty cancels; McNemar looks only at the discordant pairs (right -> wrong vs wrong -> right)
and the bootstrap resamples questions, keeping each question's pair together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vrp.analysis.stats import N_BOOT, SEED, mcnemar_exact, paired_bootstrap_diff
from vrp.analysis.type_map import tag_of

REFERENCE_CONDITION = "full"


def _records(rows: Any) -> list[dict[str, Any]]:
    """Rows as dicts from a list of dicts, a pyarrow Table, or a polars / pandas DataFrame."""
    if rows is None:
        return []
    if isinstance(rows, list):
        return rows
    if hasattr(rows, "to_pylist"):  # pyarrow
        return rows.to_pylist()
    if hasattr(rows, "to_dicts"):  # polars
        return rows.to_dicts()
    if hasattr(rows, "to_dict"):  # pandas
        return rows.to_dict("records")
    return list(rows)


def _truth(value: Any) -> bool:
    """An unparsable answer (correct is null) counts as wrong, as in the accuracy the study reports."""
    return bool(value) if value is not None else False


def _margin(row: dict[str, Any]) -> Any:
    """The answer's first-token margin: yes/no for yes/no answers, the truth margin for open ones."""
    value = row.get("yes_no_margin")
    return value if value is not None else row.get("truth_margin")


def _finite_mean(values: Iterable[Any]) -> float | None:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return float(arr.mean()) if arr.size else None


def intervention_deltas(
    interventions: Any,
    baseline: Any = None,
    *,
    by: str | None = None,
    n_boot: int = N_BOOT,
    seed: int = SEED,
) -> list[dict[str, Any]]:
    """Accuracy change of every (run, condition, level) against its paired reference.

    ``interventions``: rows of the ``interventions`` table. ``baseline``: rows of the base runs'
    ``samples`` (``run_id``, ``sample_id``, ``correct``, ``yes_no_margin`` and any ``by`` column);
    it is the reference of runs without a ``full`` condition and supplies the question type.
    ``by``: a column (``split``, ``category``) to break the result down by, besides the overall row
    (``group`` None).

    One dict per (run, condition, level, group) with: ``model``, ``run_id``, ``base_run_id``,
    ``kind``, ``setting``, ``condition``, ``level``, ``group``, ``reference`` ("full" or
    "baseline"), ``n`` (paired questions), ``acc_ref``, ``acc``, ``delta`` (acc - acc_ref),
    ``ci_low``/``ci_high`` (paired percentile bootstrap of the delta), ``b``/``c`` (right -> wrong,
    wrong -> right), ``p`` (McNemar exact), ``margin_ref``/``margin`` (mean yes/no margin). The
    ``full`` condition itself is not listed when it is the reference. Sorted by model, kind,
    setting, run, condition, level, group.
    """
    rows = _records(interventions)
    base_rows = _records(baseline)
    base_index = {(r["run_id"], r["sample_id"]): r for r in base_rows}
    runs: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        runs.setdefault(row["run_id"], []).append(row)

    out: list[dict[str, Any]] = []
    for run_id, run_rows in runs.items():
        full = {r["sample_id"]: r for r in run_rows if r["condition"] == REFERENCE_CONDITION}
        base_run_id = run_rows[0].get("base_run_id")
        if full:
            reference, ref = "full", full
        else:
            ref = {sid: r for (rid, sid), r in base_index.items() if rid == base_run_id}
            reference = "baseline"
            if not ref:
                continue  # nothing to pair with
        cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
        for row in run_rows:
            if reference == "full" and row["condition"] == REFERENCE_CONDITION:
                continue
            cells.setdefault((row["condition"], float(row["level"])), []).append(row)
        for (condition, level), cell in cells.items():
            paired = [(r, ref[r["sample_id"]]) for r in cell if r["sample_id"] in ref]
            groups: dict[Any, list[tuple[dict[str, Any], dict[str, Any]]]] = {None: paired}
            if by is not None:
                for pair in paired:
                    key = pair[0].get(by)
                    if key is None:
                        key = base_index.get((base_run_id, pair[0]["sample_id"]), {}).get(by)
                    if key is not None:
                        groups.setdefault(key, []).append(pair)
            for group, pairs in groups.items():
                if not pairs:
                    continue
                after = np.array([_truth(r["correct"]) for r, _ in pairs])
                before = np.array([_truth(f["correct"]) for _, f in pairs])
                test = mcnemar_exact(before, after)
                delta, low, high = paired_bootstrap_diff(before, after, n_boot=n_boot, seed=seed)
                first = pairs[0][0]
                out.append(
                    {
                        "model": first.get("model"),
                        "run_id": run_id,
                        "base_run_id": base_run_id,
                        "kind": first.get("kind"),
                        "setting": first.get("setting"),
                        "condition": condition,
                        "level": level,
                        "group": group,
                        "reference": reference,
                        "n": len(pairs),
                        "acc_ref": float(before.mean()),
                        "acc": float(after.mean()),
                        "delta": delta,
                        "ci_low": low,
                        "ci_high": high,
                        "b": test.b,
                        "c": test.c,
                        "p": test.p,
                        "margin_ref": _finite_mean(_margin(f) for _, f in pairs),
                        "margin": _finite_mean(_margin(r) for r, _ in pairs),
                    }
                )
    out.sort(
        key=lambda r: (
            str(r["model"]),
            str(r["kind"]),
            str(r["setting"]),
            r["run_id"],
            r["condition"],
            r["level"],
            r["group"] is not None,
            str(r["group"]),
        )
    )
    return out


def deltas_from_lake(
    lake: Any,
    *,
    run_ids: Sequence[str] | None = None,
    kind: str | None = None,
    by: str | None = None,
    type_map: Mapping[str, str] | None = None,
    n_boot: int = N_BOOT,
    seed: int = SEED,
) -> list[dict[str, Any]]:
    """:func:`intervention_deltas` over the lake's ``interventions`` (optionally some runs or one kind).

    Reads only: the base runs' ``samples`` rows provide the baseline answers and question types.
    With `type_map` (``vrp.analysis.type_map``) each base sample also gets a ``type_tag`` column,
    so ``by="type_tag"`` breaks the deltas down by the user's question-type tags.
    """
    if not lake.has_table("interventions"):
        return []
    where: dict[str, Any] = {}
    if run_ids is not None:
        where["run_id"] = list(run_ids)
    if kind is not None:
        where["kind"] = kind
    interventions = lake.arrow("interventions", filter=where or None)
    if interventions.num_rows == 0:
        return []
    bases = sorted({b for b in interventions.column("base_run_id").to_pylist() if b})
    columns = ["run_id", "sample_id", "correct", "yes_no_margin", "truth_margin", "split", "category"]
    columns += ["question_type", "answer_type"]
    baseline = lake.arrow("samples", filter={"run_id": bases}, columns=columns).to_pylist() if bases else None
    if baseline and type_map is not None:
        baseline = [{**row, "type_tag": tag_of(row["question_type"], type_map)} for row in baseline]
    return intervention_deltas(interventions, baseline, by=by, n_boot=n_boot, seed=seed)


def destruction_curve_figure(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy (with the paired 95% CI) and mean yes/no margin against the destroyed fraction.

    ``rows``: output of :func:`intervention_deltas`; only ``kind == "destroy"`` overall rows are
    drawn, one line per (model, setting), starting at fraction 0 with the reference accuracy.
    Written with the Agg canvas of a standalone ``Figure`` (no pyplot state, works headless).
    """
    from matplotlib.figure import Figure

    curves: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("kind") == "destroy" and row.get("group") is None:
            curves.setdefault((str(row["model"]), str(row["setting"])), []).append(row)
    if not curves:
        raise ValueError("no destroy rows to draw: run `vrp ingest intervene destroy` first")
    fig = Figure(figsize=(10, 4), layout="constrained")
    acc_ax, margin_ax = fig.subplots(1, 2)
    for (model, setting), points in sorted(curves.items()):
        points = sorted(points, key=lambda r: r["level"])
        x = [0.0] + [p["level"] for p in points]
        acc = np.array([points[0]["acc_ref"]] + [p["acc"] for p in points])
        low = np.array([0.0] + [p["acc"] - (p["acc_ref"] + p["ci_low"]) for p in points])
        high = np.array([0.0] + [(p["acc_ref"] + p["ci_high"]) - p["acc"] for p in points])
        label = f"{model} ({setting})"
        acc_ax.errorbar(x, acc, yerr=np.clip([low, high], 0, None), marker="o", capsize=3, label=label)
        margins = [points[0]["margin_ref"]] + [p["margin"] for p in points]
        margin_ax.plot(x, [np.nan if m is None else m for m in margins], marker="o", label=label)
    acc_ax.set(xlabel="fraction of MLP-output coordinates zeroed", ylabel="accuracy", ylim=(0, 1))
    acc_ax.set_title("Destruction sweep: accuracy")
    margin_ax.set(xlabel="fraction of MLP-output coordinates zeroed", ylabel="mean yes/no logit margin")
    margin_ax.set_title("Destruction sweep: yes/no margin")
    margin_ax.axhline(0.0, color="grey", linewidth=0.5)
    acc_ax.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def patch_heatmap_figure(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """The causal-tracing heatmap: mean restoration by layer x site, one panel per model and pairing.

    ``rows``: the named query ``patch_restoration`` (model, site, layer, mean_restoration, n,
    positions, pairs). Colour 1 = the donor's truth margin fully restored, 0 = no change.
    """
    from matplotlib.figure import Figure

    panels: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("mean_restoration") is not None:
            panels.setdefault((str(row["model"]), str(row["positions"]), str(row["pairs"])), []).append(row)
    if not panels:
        raise ValueError("no patch rows to draw: run `vrp intervene patch` first")
    sites = ("resid", "attn_out", "mlp_out")
    fig = Figure(figsize=(4.5 * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, ((model, positions, pairs), cells) in zip(axes, sorted(panels.items()), strict=True):
        layers = sorted({int(c["layer"]) for c in cells})
        grid = np.full((len(sites), len(layers)), np.nan)
        for c in cells:
            if c["site"] in sites:
                grid[sites.index(c["site"]), layers.index(int(c["layer"]))] = c["mean_restoration"]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=min(0.0, np.nanmin(grid)), vmax=1.0)
        ax.set(xticks=range(len(layers)), xticklabels=layers, yticks=range(len(sites)), yticklabels=sites)
        ax.set_xlabel("layer")
        ax.set_title(f"{model}\n({positions} positions, {pairs} pairs)", fontsize="small")
        fig.colorbar(image, ax=ax, label="mean restoration")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def knockout_figure(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Change in accuracy and truth margin by knockout window, one line per model and source.

    ``rows``: the named query ``knockout_effects`` (model, source, window, first_layer,
    delta_accuracy, delta_truth_margin, n, ...). Where the lines dip is where image information
    flows into the answer.
    """
    from matplotlib.figure import Figure

    lines: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        lines.setdefault((str(row["model"]), str(row["source"])), []).append(row)
    if not lines:
        raise ValueError("no knockout rows to draw: run `vrp intervene knockout` first")
    fig = Figure(figsize=(10, 4), layout="constrained")
    acc_ax, margin_ax = fig.subplots(1, 2)
    for (model, source), points in sorted(lines.items()):
        points = sorted(points, key=lambda r: (r["first_layer"], str(r["window"])))
        x = [p["first_layer"] for p in points]
        label = f"{model} (from {source})"
        acc_ax.plot(x, [100 * p["delta_accuracy"] for p in points], marker="o", label=label)
        margin_ax.plot(x, [p["delta_truth_margin"] for p in points], marker="o", label=label)
    ticks = sorted({int(p["first_layer"]) for points in lines.values() for p in points})
    for ax, what in ((acc_ax, "accuracy (pp)"), (margin_ax, "mean truth margin")):
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_xticks(ticks)
        ax.set(xlabel="first layer of the knocked-out window", ylabel=f"change in {what}")
    acc_ax.set_title("Knockout of image attention: accuracy")
    margin_ax.set_title("Knockout of image attention: truth margin")
    acc_ax.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
