"""The study's analyses on a lake: headline correlations, probes, margins, interventions.

Each function reads an open lake (never writes) and returns plain results; ``vrp analyze`` prints
them, ``vrp analyze probes`` also stores its results, and ``vrp report`` renders them all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from vrp.analysis import data, margins, probes, stats
from vrp.lake import Lake

BEST_PROBE = "best probe (held-out)"


@dataclass
class RunProbes:
    """Probe results of one run at one site and where they came from ("lake" or "computed")."""

    run_id: str
    model: str
    site: str
    results: list[probes.ProbeResult]
    source: str
    note: str | None = None


def run_probes(
    lake: Lake,
    run_id: str,
    *,
    site: str = "resid",
    seed: int = probes.SEED,
    n_boot: int = stats.N_BOOT,
    mlp: bool = True,
    progress: Callable | None = None,
) -> RunProbes:
    """Full probe sweep of one run from its stored hidden states (in memory)."""
    s = data.scored_samples(lake, run_id)
    layers = data.hidden_layers(lake, run_id, site)
    if not layers:
        raise probes.ProbeError(f"run {run_id} has no hidden states at site {site!r}")
    load = data.hidden_loader(lake, run_id, site, s.sample_ids)
    res = probes.probe_sweep(
        layers, load, s.y, s.groups, site=site, seed=seed, n_boot=n_boot, mlp=mlp, progress=progress
    )
    note = res[0].note if res else None
    return RunProbes(run_id=run_id, model=s.model, site=site, results=res, source="computed", note=note)


def stored_probes(lake: Lake, run_id: str, site: str = "resid") -> list[dict]:
    """The `probe_layers` rows of a run and site, sorted by probe and layer."""
    if not lake.has_table("probe_layers"):
        return []
    rows = lake.arrow("probe_layers", filter={"run_id": run_id, "site": site}).to_pylist()
    return sorted(rows, key=lambda r: (r["probe"], r["layer"]))


def best_probe_scores(
    lake: Lake, run_id: str, *, site: str = "resid", seed: int = probes.SEED, n_boot: int = stats.N_BOOT
) -> tuple[RunProbes, dict[str, float]] | None:
    """Probe results for a run (stored if present, else computed) and the best layer's held-out scores.

    Stored rows hold AUROCs only, so the best layer's out-of-fold scores are recomputed (same
    folds and seed, hence the same numbers). None when the run has no hidden states.
    """
    s = data.scored_samples(lake, run_id)
    layers = data.hidden_layers(lake, run_id, site)
    if not layers or s.y.size == 0:
        return None
    stored = [r for r in stored_probes(lake, run_id, site) if r["probe"] == "logreg"]
    if stored:
        best = max(stored, key=lambda r: (r["auroc"], -r["layer"]))["layer"]
        plan = probes.make_folds(s.y, s.groups, seed=seed)
        x = data.hidden_loader(lake, run_id, site, s.sample_ids)(best)
        scores = probes.logreg_folds(x, s.y, plan.folds).oof
        rp = RunProbes(run_id=run_id, model=s.model, site=site, results=[], source="lake", note=plan.note)
        rp.results = [_stored_result(r, site) for r in stored_probes(lake, run_id, site)]
    else:
        rp = run_probes(lake, run_id, site=site, seed=seed, n_boot=n_boot, mlp=False)
        best = probes.best_layer(rp.results)
        scores = next(r.scores for r in rp.results if r.probe == "logreg" and r.layer == best)
    return rp, dict(zip(s.sample_ids.tolist(), scores.tolist(), strict=True))


def _stored_result(row: dict, site: str) -> probes.ProbeResult:
    return probes.ProbeResult(
        site=site,
        layer=row["layer"],
        probe=row["probe"],
        auroc=row["auroc"],
        auroc_low=row["auroc_low"],
        auroc_high=row["auroc_high"],
        accuracy=row.get("accuracy") or float("nan"),
        n=row["n"] or 0,
        n_pos=row.get("n_pos") or 0,
        folds=row["folds"] or 0,
        seed=row.get("seed") or 0,
    )


@dataclass
class Headline:
    """The headline table: rows per metric and group, plus the probes it used."""

    rows: list[stats.Correlation]
    groups: list[str]
    metrics: list[str]
    probes: list[RunProbes] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    fusions: list = field(default_factory=list)  # vrp.analysis.fusion.FusionFit of each image run


def headline(
    lake: Lake,
    *,
    models: Sequence[str] | None = None,
    n_boot: int = stats.N_BOOT,
    seed: int = stats.SEED,
    with_probe: bool = True,
    with_fusion: bool = True,
) -> Headline:
    """R_pb [CI], AUROC [CI] and n of every headline metric per model and pooled, BH per column."""
    ci = data.query(lake, "correlation_inputs").to_pylist()
    if models:
        ci = [r for r in ci if r["model"] in models]
    # one group per model, and per task when the lake holds several: yes/no and open answers are
    # different populations, so their correlations are never pooled together
    tasks = sorted({r["task"] for r in ci})
    by_model: dict[str, list[dict]] = defaultdict(list)
    task_of_group: dict[str, str] = {}
    for r in ci:
        group = r["model"] if len(tasks) < 2 else f"{r['model']} [{r['task']}]"
        by_model[group].append(r)
        task_of_group[group] = r["task"]
    run_probe_list: list[RunProbes] = []
    probe_score: dict[tuple[str, str], float] = {}
    skipped: list[str] = []
    if with_probe:
        for run in data.base_runs(lake, sorted({r["model"] for r in ci})):
            try:
                got = best_probe_scores(lake, run["run_id"], seed=seed, n_boot=n_boot)
            except probes.ProbeError as exc:
                skipped.append(f"{run['model']} run {run['run_id']}: no probe ({exc})")
                continue
            if got is not None:
                run_probe_list.append(got[0])
                probe_score.update({(run["run_id"], sid): v for sid, v in got[1].items()})
    groups = {}
    labels = [label for label, _, _ in data.HEADLINE_METRICS]
    directions = {label: d for label, _, d in data.HEADLINE_METRICS}
    dependence = visual_dependence(lake)
    dependence_labels = sorted({label for values in dependence.values() for label in values})
    directions.update(dict.fromkeys(dependence_labels, 1))
    for model, rows in sorted(by_model.items()):
        mets = {
            label: np.array([np.nan if r[col] is None else float(r[col]) for r in rows])
            for label, col, _ in data.HEADLINE_METRICS
        }
        for label in dependence_labels:
            mets[label] = np.array(
                [dependence.get((r["run_id"], r["sample_id"]), {}).get(label, np.nan) for r in rows]
            )
        mets = {k: v for k, v in mets.items() if not np.all(np.isnan(v))}
        if probe_score:
            p = np.array([probe_score.get((r["run_id"], r["sample_id"]), np.nan) for r in rows])
            if not np.all(np.isnan(p)):
                mets[BEST_PROBE] = p
        groups[model] = (mets, np.array([r["y"] for r in rows]))
    directions[BEST_PROBE] = 1
    fused_labels: list[str] = []
    fits: list = []
    if with_fusion:
        fused_labels, fits = _add_fused_scores(
            lake, groups, by_model, probe_score, skipped, seed=seed, n_boot=n_boot
        )
        directions.update(dict.fromkeys(fused_labels, 1))
    table: list[stats.Correlation] = []
    names: list[str] = []
    for task in tasks:
        part = {g: v for g, v in groups.items() if task_of_group[g] == task}
        pooled = ("pooled" if len(tasks) < 2 else f"pooled [{task}]") if len(part) > 1 else None
        table += stats.correlation_tables(
            part, pooled=pooled, directions=directions, n_boot=n_boot, seed=seed
        )
        names += [*sorted(part), *([pooled] if pooled else [])]
    by_group: dict[str, list[stats.Correlation]] = defaultdict(list)
    for row in table:
        by_group[row.group].append(row)
    rows = [r for g in by_group.values() for r in stats.with_bh(g)]
    return Headline(
        rows=rows,
        groups=names,
        metrics=[*labels, *dependence_labels, BEST_PROBE, *fused_labels],
        probes=run_probe_list,
        skipped=skipped,
        fusions=fits,
    )


FUSED = "fused score (held-out)"
CONTRIB_MODEL = "logit-contribution model (held-out)"


def _add_fused_scores(
    lake: Lake,
    groups: dict,
    by_model: dict[str, list[dict]],  # headline group (model, or model [task]) -> its rows
    probe_score: dict[tuple[str, str], float],
    skipped: list[str],
    *,
    seed: int,
    n_boot: int,
) -> tuple[list[str], list]:
    """Add each run's out-of-fold fused and logit-contribution scores to the headline groups.

    Returns the labels added and the fits. The probe feature uses the scores already computed for
    the headline (none when the headline has no probe), so nothing is fitted twice.
    """
    from vrp.analysis import fusion

    per_run: dict[str, dict[str, float]] = defaultdict(dict)
    for (run_id, sample_id), value in probe_score.items():
        per_run[run_id][sample_id] = value
    models = sorted({r["model"] for rows in by_model.values() for r in rows})
    fits, notes = fusion.run_fusions(
        lake, models=models, seed=seed, n_boot=n_boot, probe_scores=dict(per_run)
    )
    skipped.extend(notes)
    label = {"fusion": FUSED, "logit contributions": CONTRIB_MODEL}
    score = {(label[f.name], f.run_id, s): v for f in fits for s, v in zip(f.sample_ids, f.oof, strict=True)}
    added = []
    for name in (FUSED, CONTRIB_MODEL):
        for model, rows in by_model.items():
            values = np.array([score.get((name, r["run_id"], r["sample_id"]), np.nan) for r in rows])
            if not np.all(np.isnan(values)):
                groups[model][0][name] = values
                if name not in added:
                    added.append(name)
    return added, fits


def dependence_label(kind: str, condition: str) -> str:
    """Headline label of a visual-dependence signal: ``kind`` is "margin" or "kl"."""
    what = "Δ truth margin" if kind == "margin" else "first-token KL"
    return f"visual dependence: {what} ({condition})" if condition else f"visual dependence: {what}"


def visual_dependence(lake: Lake) -> dict[tuple[str, str], dict[str, float]]:
    """(image run id, sample id) -> {headline label: value} from the `visual_dependence` query.

    One pair of signals per condition (the last-layer Δ truth margin and the first-token KL); a
    model with several runs of one condition keeps the latest run's value for a question.
    """
    from vrp.schema import CONDITION_KINDS

    if not lake.has_table("runs") or not any(
        r.get("kind") in CONDITION_KINDS for r in lake.arrow("runs", columns=["kind"]).to_pylist()
    ):
        return {}
    out: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in data.query(lake, "visual_dependence").to_pylist():
        values = out[(r["run_id"], r["sample_id"])]
        for kind, column in (("margin", "delta_truth_margin"), ("kl", "first_token_kl")):
            if r[column] is not None:
                values[dependence_label(kind, r["condition"])] = float(r[column])
    return dict(out)


@dataclass
class ModelMargins:
    """Margin formation of one model, pooled over its runs."""

    model: str
    curves: margins.MarginCurves
    max_separation: int | None
    lock_in: np.ndarray  # per sample, -1 = never
    correct: np.ndarray
    entropy: margins.EntropyProfile | None


def model_margins(lake: Lake, models: Sequence[str] | None = None) -> list[ModelMargins]:
    """Per model: truth-margin curves by correctness, lock-in layers and spatial-entropy profile."""
    out = []
    runs_by_model: dict[str, list[str]] = defaultdict(list)
    for run in data.base_runs(lake, models):
        runs_by_model[run["model"]].append(run["run_id"])
    for model, run_ids in sorted(runs_by_model.items()):
        margin_parts, rank_parts, ent_parts, ys, layer_sets = [], [], [], [], []
        for run_id in run_ids:
            s = data.scored_samples(lake, run_id)
            if s.y.size == 0:
                continue
            layers, m = data.layer_matrix(lake, run_id, "lens_truth_margin", s.sample_ids)
            _, rank = data.layer_matrix(lake, run_id, "lens_answer_rank", s.sample_ids)
            _, ent = data.layer_matrix(lake, run_id, "spatial_entropy", s.sample_ids)
            if layers.size == 0:
                continue
            layer_sets.append(tuple(layers))
            margin_parts.append(m)
            rank_parts.append(rank)
            ent_parts.append(ent)
            ys.append(s.y)
        if not margin_parts or len(set(layer_sets)) != 1:
            continue
        layers = np.array(layer_sets[0])
        m = np.vstack(margin_parts)
        rank = np.vstack(rank_parts)
        ent = np.vstack(ent_parts)
        y = np.concatenate(ys)
        ok = ~np.isnan(m).any(axis=1)
        curves = margins.margin_curves(m[ok], y[ok], layers)
        rank_ok = ~np.isnan(rank).any(axis=1)
        lock = margins.lock_in_layers(rank[rank_ok].astype(int), layers)
        ent_ok = ~np.isnan(ent).any(axis=1)
        profile = margins.entropy_deltas(ent[ent_ok], layers) if ent_ok.any() else None
        out.append(
            ModelMargins(
                model=model,
                curves=curves,
                max_separation=margins.max_separation_layer(curves),
                lock_in=lock,
                correct=y[rank_ok],
                entropy=profile,
            )
        )
    return out


def entropy_profiles(lake: Lake, models: Sequence[str] | None = None) -> dict[str, margins.EntropyProfile]:
    """Mean spatial entropy per layer and its change, per model, over all answers (parsed or not)."""
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in data.query(lake, "spatial_entropy_by_layer").to_pylist():
        if r["spatial_entropy"] is not None and (not models or r["model"] in models):
            by_model[r["model"]].append(r)
    out = {}
    for model, rows in sorted(by_model.items()):
        rows.sort(key=lambda r: r["layer"])
        mean = np.array([r["spatial_entropy"] for r in rows])
        layers = np.array([r["layer"] for r in rows])
        out[model] = margins.EntropyProfile(layers=layers, mean=mean, delta=np.r_[np.nan, np.diff(mean)])
    return out


def neuron_rankings(
    lake: Lake, run_id: str, layers: Iterable[int] | None = None, *, seed: int = probes.SEED
) -> list[dict]:
    """`probe_neurons` rows (site mlp_out): the L1 and L2 rankings of each requested layer."""
    s = data.scored_samples(lake, run_id)
    available = data.hidden_layers(lake, run_id, "mlp_out")
    chosen = available if layers is None else [available[k] if k < 0 else k for k in layers]
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise probes.ProbeError(f"run {run_id} has no mlp_out states at layers {missing} (have {available})")
    load = data.hidden_loader(lake, run_id, "mlp_out", s.sample_ids)
    rows = []
    for layer in chosen:
        x = load(layer)
        for method, ranking in (
            ("l1", probes.rank_neurons_l1(x, s.y, seed=seed)),
            ("l2", probes.rank_neurons_l2(x, s.y)),
        ):
            rows += [
                {
                    "site": "mlp_out",
                    "layer": layer,
                    "method": method,
                    "neuron": r.neuron,
                    "coef": r.coef,
                    "rank": r.rank,
                }
                for r in ranking
            ]
    return rows
