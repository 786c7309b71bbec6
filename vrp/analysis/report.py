"""`vrp report`: the study's tables and figures from a lake, as Markdown and one self-contained HTML page.

The report only reads the lake (what is not stored, such as probes, is computed in memory), so
it also runs on a read-only shared lake. It is built for schedules (cron, CI):

- the table versions it read go to ``versions.json`` in its folder; when the lake has not changed
  since the latest report, ``write_report`` returns "unchanged" and writes nothing (unless forced);
- each report goes to a dated subfolder of the output directory and ``latest`` points at it;
- the same lake renders the same bytes, apart from the one line that says when it was generated
  (figures are rendered with Agg and saved without software/date metadata).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from vrp.analysis import attribution, compute, data, margins, stats
from vrp.analysis.interventions import (
    deltas_from_lake,
    destruction_curve_figure,
    knockout_figure,
    patch_heatmap_figure,
)
from vrp.analysis.type_map import tag_metrics
from vrp.lake import Lake, open_lake
from vrp.lake.query import named_query

TIMESTAMP_PREFIX = "Generated "
_FIG_DPI = 100


@dataclass(frozen=True)
class Outcome:
    """What ``write_report`` did: "written" (path = the new folder) or "unchanged" (path = latest)."""

    status: str
    path: Path
    message: str


# ----------------------------------------------------------------------------- formatting


def _num(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def _p(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2g}" if v >= 1e-4 else f"{v:.1e}"


def _cell_r(c: stats.Correlation) -> str:
    if c.status == "constant":
        return f"constant ({c.extra.get('value'):g})"
    if c.status != "ok":
        return c.status
    return f"{_num(c.r)} [{_num(c.boot_low)}, {_num(c.boot_high)}]"


def _cell_auc(c: stats.Correlation) -> str:
    if c.status != "ok":
        return "-"
    return f"{_num(c.auroc)} [{_num(c.auroc_low)}, {_num(c.auroc_high)}]"


@dataclass
class Table:
    """A titled table rendered to Markdown and HTML alike."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    links: list[str | None] | None = None  # per row, where its first cell links to (a viewer page)

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "|".join("---" for _ in self.header) + "|")
        for i, row in enumerate(self.rows):
            cells = [c.replace("|", "\\|") for c in row]
            link = self.links[i] if self.links else None
            if link and cells:
                text = cells[0].replace("[", "\\[").replace("]", "\\]")
                cells[0] = f"[{text}](<{link}>)"
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        rows = []
        for i, row in enumerate(self.rows):
            cells = [html.escape(c) for c in row]
            link = self.links[i] if self.links else None
            if link and cells:
                cells[0] = f'<a href="{html.escape(link)}">{cells[0]}</a>'
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        body = "".join(rows)
        note = f"<p>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3>{note}<table><tr>{head}</tr>{body}</table>"


# ----------------------------------------------------------------------------- content


def headline_table(h: compute.Headline, n_boot: int = stats.N_BOOT) -> Table:
    """Rows = metrics; per group: R_pb [bootstrap 95% CI], AUROC [95% CI], n."""
    cells = {(c.metric, c.group): c for c in h.rows}
    header = ["metric"]
    for g in h.groups:
        header += [f"{g} R_pb [95% CI]", f"{g} AUROC [95% CI]", f"{g} n"]
    rows = []
    for m in h.metrics:
        if not any((m, g) in cells for g in h.groups):
            continue
        row = [m]
        for g in h.groups:
            c = cells.get((m, g))
            row += ["-", "-", "0"] if c is None else [_cell_r(c), _cell_auc(c), str(c.n)]
        rows.append(row)
    note = (
        "R_pb is Pearson r of the raw metric with y (1 = correct answer), with a percentile bootstrap CI "
        f"({n_boot:,} resamples, seeded; the pooled column resamples within each model). AUROC scores "
        "the metric oriented so that larger means correct (entropies negated). Unparsable answers are "
        "left out. The best probe is the held-out (out-of-fold, image-grouped 5-fold) logistic probe "
        "score of each run's best layer; choosing that layer on the same folds is a mild optimistic bias. "
        "Visual dependence (with condition runs): the image run's last-layer truth margin minus the "
        "condition run's (like every truth margin it reads the label's token, so it partly restates "
        "correctness), and the first-token KL(image || condition), which is label-free. The fused "
        "score and the logit-contribution model are out-of-fold logistic regressions (see Combined "
        "scores)."
    )
    if not rows:
        note = "No scored answers yet (every answer unparsable, or no runs): nothing to correlate. " + note
    if h.skipped:
        note += " " + " ".join(h.skipped)
    return Table("Headline: which signals predict a correct answer", header, rows, note)


def detail_table(h: compute.Headline) -> Table:
    rows = []
    for c in sorted(h.rows, key=lambda c: (h.groups.index(c.group), h.metrics.index(c.metric))):
        rows.append(
            [
                c.group,
                c.metric,
                str(c.n),
                str(c.n_correct),
                c.status,
                _num(c.r),
                _p(c.p),
                _p(c.q),
                f"[{_num(c.fisher_low)}, {_num(c.fisher_high)}]",
                f"[{_num(c.boot_low)}, {_num(c.boot_high)}]",
                _num(c.auroc),
            ]
        )
    return Table(
        "Correlation details",
        [
            "group",
            "metric",
            "n",
            "n correct",
            "status",
            "R_pb",
            "p",
            "q (BH)",
            "Fisher 95% CI",
            "bootstrap 95% CI",
            "AUROC",
        ],
        rows,
        "q: Benjamini-Hochberg over the metrics of one column; constant metrics are not in the family.",
    )


def pope_table(lake: Lake) -> Table:
    rows = []
    for r in data.query(lake, "pope_metrics").to_pylist():
        rows.append(
            [
                r["model"],
                r["dataset"],
                r["split"],
                str(r["n"]),
                str(r["unknown"]),
                _num(r["accuracy"]),
                _num(r["precision"]),
                _num(r["recall"]),
                _num(r["f1"]),
                _num(r["yes_ratio"]),
            ]
        )
    return Table(
        "POPE metrics from the models' parsed answers",
        ["model", "dataset", "split", "n", "unknown", "accuracy", "precision", "recall", "F1", "yes-ratio"],
        rows,
        "Unparsable answers count as wrong and as not-yes.",
    )


def vqa_tables(lake: Lake, type_map: Mapping[str, str] | None = None) -> list[Table]:
    """Open answers: accuracy and mean VQA score per run overall, per answer type (and per tag of
    the user's type map), then per question type."""
    metrics = data.query(lake, "vqa_metrics").to_pylist()
    head = ["model", "dataset", "run", "group", "n", "scored", "accuracy", "mean score"]

    def cells(r: dict, group: str) -> list[str]:
        return [
            r["model"],
            r["dataset"],
            r["run_id"],
            group,
            str(r["n"]),
            str(r["n_scored"]),
            _num(r["accuracy"]),
            _num(r["mean_score"]),
        ]

    main = [
        cells(r, r["type"] if r["level"] == "answer_type" else "all")
        for r in metrics
        if r["level"] != "question_type"
    ]
    note = (
        "Accuracy follows each run's `correct` rule (lenient: the normalised answer equals the main "
        "answer or one contains the other; exact; or vqa: score >= 0.5); the mean score is the official "
        "VQA accuracy against the human answers. Answers without human answers, and empty answers, are "
        "counted in n but not scored."
    )
    if type_map is not None:
        main += [cells(r, f"tag: {r['tag']}") for r in tag_metrics(metrics, type_map)]
        note += " Tags come from the --type-map file (longest question-type prefix)."
    per_type = [cells(r, r["type"]) for r in metrics if r["level"] == "question_type"]
    return [
        Table("VQA metrics (open answers)", head, main, note),
        Table(
            "VQA metrics per question type",
            head,
            per_type,
            "The `question_type` of each question's annotation.",
        ),
    ]


def probe_table(h: compute.Headline) -> Table:
    rows = []
    for rp in sorted(h.probes, key=lambda p: (p.model, p.run_id)):
        for r in sorted(rp.results, key=lambda r: (r.probe, r.layer)):
            if r.probe == "logreg":
                continue
            rows.append(
                [
                    rp.model,
                    rp.run_id,
                    r.probe,
                    str(r.layer),
                    _num(r.auroc),
                    f"[{_num(r.auroc_low)}, {_num(r.auroc_high)}]",
                    str(r.folds),
                    rp.source,
                ]
            )
        logreg = [r for r in rp.results if r.probe == "logreg"]
        if logreg:
            best = max(logreg, key=lambda r: (r.auroc, -r.layer))
            rows.append(
                [
                    rp.model,
                    rp.run_id,
                    "logreg (best layer)",
                    str(best.layer),
                    _num(best.auroc),
                    f"[{_num(best.auroc_low)}, {_num(best.auroc_high)}]",
                    str(best.folds),
                    rp.source,
                ]
            )
    notes = sorted({rp.note for rp in h.probes if rp.note})
    return Table(
        "Held-out probes",
        ["model", "run", "probe", "layer", "AUROC", "95% CI", "folds", "source"],
        rows,
        " ".join(notes),
    )


def margin_table(mm: Sequence[compute.ModelMargins]) -> Table:
    rows = []
    for m in mm:
        locked = m.lock_in[m.lock_in >= 0]
        right, wrong = m.lock_in[m.correct & (m.lock_in >= 0)], m.lock_in[~m.correct & (m.lock_in >= 0)]
        rows.append(
            [
                m.model,
                str(m.curves.n_correct + m.curves.n_incorrect),
                "-" if m.max_separation is None else str(m.max_separation),
                _num(float(np.median(locked)), 1) if locked.size else "-",
                _num(float(np.median(right)), 1) if right.size else "-",
                _num(float(np.median(wrong)), 1) if wrong.size else "-",
                "-" if m.entropy is None or m.entropy.sharpest_drop is None else str(m.entropy.sharpest_drop),
            ]
        )
    return Table(
        "Margin formation",
        [
            "model",
            "n",
            "layer of largest correct/incorrect separation",
            "median lock-in layer",
            "... correct",
            "... incorrect",
            "layer of sharpest H_s drop",
        ],
        rows,
        "Lock-in: the first layer from which the logit lens's top token is the final answer's token "
        "at every later layer. Separation: |mean truth margin of correct - incorrect answers|.",
    )


def attribution_table(found: Sequence[attribution.Attribution]) -> Table:
    """Per model and condition: the peak visual layer, MLP shares, flips, KL and language-prior answers."""
    rows = []
    for a in found:
        j = list(a.layers).index(a.peak)
        d = a.delta["all"]
        unchanged = ", ".join(f"{k} {v:.2f} (n={n})" for k, (v, n) in a.unchanged.items()) or "-"
        rows.append(
            [
                a.model,
                a.condition,
                str(d.n),
                str(a.peak),
                f"{d.mean[j]:+.3f} [{_num(d.low[j])}, {_num(d.high[j])}]",
                _pct(a.shares["peak"]),
                _pct(a.shares["boosting"]),
                _pct(a.shares["suppression"]),
                _pct(a.shares["all"]),
                _num(a.flip_rate),
                _num(a.mean_kl, 4),
                unchanged,
            ]
        )
    return Table(
        "Visual attribution: image minus condition",
        [
            "model",
            "condition",
            "n",
            "peak visual layer",
            "Δ truth margin at peak [95% CI]",
            "MLP share at peak",
            "MLP share, boosting layers",
            "... suppression layers",
            "... all layers",
            "answer flip rate",
            "mean first-token KL (nats)",
            "answers unchanged without the image, per question type or split",
        ],
        rows,
        "Δ truth margin = the logit-lens truth margin of the image run minus that of the condition run "
        "on the same question, averaged over the image run's scored answers (percentile bootstrap CI). "
        "The peak visual layer is its argmax. MLP share = sum of mean |MLP| / (sum of mean |MLP| + "
        "sum of mean |attention|) direct contributions to the truth logit in the image run, over the "
        "peak, the boosting (mean Δ > 0), the suppression (mean Δ < 0) or all layers. KL is KL(image || "
        "condition) of the first-token distributions. Unchanged answers are what the language prior "
        "alone gives (for blank/noise: a degraded image).",
    )


def fusion_table(fits: Sequence) -> Table:
    """Held-out AUROC of the fused score and the logit-contribution model, with their largest weights."""
    rows = []
    for f in fits:
        top = sorted(f.coefficients.items(), key=lambda kv: -abs(kv[1]))[:4]
        rows.append(
            [
                f.model,
                f.name,
                str(f.n),
                f"{_num(f.auroc)} [{_num(f.auroc_low)}, {_num(f.auroc_high)}]",
                str(f.folds),
                ", ".join(f"{k} {v:+.2f}" for k, v in top),
            ]
        )
    return Table(
        "Combined scores (held-out)",
        ["model", "model fitted", "n", "AUROC [95% CI]", "folds", "largest coefficients (per SD)"],
        rows,
        "Logistic regressions scored out of fold on the probes' image-grouped folds, each fold's "
        "z-scoring fitted on its training rows only. Fusion: -H_s, C_k, first-token probability, "
        "self-consistency, the first-token KL against each condition (when condition runs exist) and "
        "the best probe's out-of-fold score. Logit contributions (the study's model): attention and "
        "MLP direct contributions to the truth logit at the last 6 layers; they project onto the "
        "label's token, so this AUROC is not that of a label-free detector. Coefficients from one "
        "fit on all rows.",
    )


def intervention_table(effects: Sequence[dict], *, by: str | None = None) -> Table:
    """Rows of :func:`vrp.analysis.interventions.intervention_deltas`: overall, or per group of `by`."""
    chosen = [e for e in effects if (e["group"] is None) == (by is None)]
    rows = [
        [
            str(e["model"]),
            str(e["kind"]),
            e["condition"],
            *([] if by is None else [str(e["group"])]),
            _num(e["level"], 2),
            str(e["setting"]),
            e["reference"],
            str(e["n"]),
            _num(e["acc_ref"]),
            _num(e["acc"]),
            f"{100 * e['delta']:+.1f}",
            f"[{100 * e['ci_low']:+.1f}, {100 * e['ci_high']:+.1f}]",
            f"{e['b']}/{e['c']}",
            _p(e["p"]),
        ]
        for e in chosen
    ]
    header = [
        "model",
        "kind",
        "condition",
        "level",
        "setting",
        "reference",
        "n",
        "ref. acc.",
        "acc.",
        "delta (pp)",
        "95% CI (pp)",
        "right->wrong / wrong->right",
        "McNemar p",
    ]
    note = (
        "Paired per question against the run's own `full` condition when it has one, else the base "
        "run's answers; exact McNemar test and a paired bootstrap CI of the change."
    )
    if by is not None:
        header.insert(3, by.replace("_", " "))
        return Table(f"Interventions per {by.replace('_', ' ')}", header, rows, note)
    return Table("Interventions", header, rows, note)


def provenance_table(runs: Sequence[dict]) -> Table:
    cols = [
        "run_id",
        "model",
        "model_source",
        "model_revision",
        "dataset",
        "split",
        "dtype",
        "device",
        "attention_backend",
        "code_version",
        "status",
        "n_done",
        "n_failed",
        "kind",
        "base_run_id",
    ]
    rows = [["-" if r.get(c) is None else str(r.get(c)) for c in cols] for r in runs]
    return Table("Runs (provenance)", cols, rows)


# ----------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "vrp"
    plt.rcParams["path.simplify"] = True
    return plt


def _save(fig, path: Path) -> None:
    """PNG without the Software tag (the only metadata that would change between versions)."""
    fig.savefig(path, dpi=_FIG_DPI, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)


def figure_probes(h: compute.Headline, path: Path) -> bool:
    curves = [
        (rp, sorted((r for r in rp.results if r.probe == "logreg"), key=lambda r: r.layer))
        for rp in sorted(h.probes, key=lambda p: (p.model, p.run_id))
    ]
    curves = [(rp, rs) for rp, rs in curves if rs]
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for rp, rs in curves:
        x = [r.layer for r in rs]
        ax.plot(x, [r.auroc for r in rs], marker="o", ms=3, label=f"{rp.model} ({rp.run_id[:8]})")
        ax.fill_between(x, [r.auroc_low for r in rs], [r.auroc_high for r in rs], alpha=0.2)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
        xlabel="layer", ylabel="held-out AUROC", title="Logistic probe of correctness by layer (site resid)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def figure_margins(mm: Sequence[compute.ModelMargins], path: Path) -> bool:
    if not mm:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(mm), figsize=(4 * len(mm), 3.5), squeeze=False)
    for ax, m in zip(axes[0], mm, strict=True):
        c = m.curves
        for mean, sem, label in (
            (c.mean_correct, c.sem_correct, "correct"),
            (c.mean_incorrect, c.sem_incorrect, "incorrect"),
        ):
            ax.plot(c.layers, mean, label=label)
            ax.fill_between(c.layers, mean - np.nan_to_num(sem), mean + np.nan_to_num(sem), alpha=0.2)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set(title=m.model, xlabel="layer", ylabel="logit-lens truth margin")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def figure_entropy(profiles: dict[str, margins.EntropyProfile], path: Path) -> bool:
    if not profiles:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for model, p in profiles.items():
        x = p.layers / max(int(p.layers.max()), 1)
        ax.plot(x, p.mean, marker="o", ms=3, label=model)
    ax.set(
        xlabel="layer / last layer",
        ylabel="mean spatial entropy H_s (nats)",
        title="Spatial entropy of the answer position's attention by layer",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def figure_attribution(found: Sequence[attribution.Attribution], path: Path) -> bool:
    """Per model: mean Δ truth margin by layer, one line per condition, each condition's peak marked."""
    by_model: dict[str, list[attribution.Attribution]] = {}
    for a in found:
        by_model.setdefault(a.model, []).append(a)
    if not by_model:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(by_model), figsize=(4 * len(by_model), 3.5), squeeze=False)
    for ax, (model, pairs) in zip(axes[0], sorted(by_model.items()), strict=True):
        for a in pairs:
            d = a.delta["all"]
            (line,) = ax.plot(a.layers, d.mean, marker="o", ms=3, label=f"image - {a.condition}")
            if np.isfinite(d.low).all():
                ax.fill_between(a.layers, d.low, d.high, alpha=0.15, color=line.get_color())
            j = list(a.layers).index(a.peak)
            ax.plot([a.peak], [d.mean[j]], marker="*", ms=14, color=line.get_color(), ls="none")
            ax.annotate(
                f"peak L{a.peak}", (a.peak, d.mean[j]), textcoords="offset points", xytext=(4, 6), fontsize=8
            )
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set(title=model, xlabel="layer", ylabel="mean Δ truth margin (image - condition)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


# ----------------------------------------------------------------------------- assembly


def _causal_figures(lake: Lake, figdir: Path) -> list[tuple[str, str]]:
    """The causal-tracing heatmap (patch) and the knockout curves, when the lake has those runs."""
    out = []
    restoration = data.query(lake, "patch_restoration").to_pylist()
    if any(r["mean_restoration"] is not None for r in restoration):
        patch_heatmap_figure(restoration, figdir / "patch_restoration.png")
        out.append(("patch_restoration.png", "Activation patching: restoration by layer and site"))
    knockout = data.query(lake, "knockout_effects").to_pylist()
    if knockout:
        knockout_figure(knockout, figdir / "knockout_by_window.png")
        out.append(("knockout_by_window.png", "Attention knockout: change by window of layers"))
    return out


def confident_wrong_table(lake: Lake, view_href: Callable[[str, str], str | None] | None) -> Table | None:
    """The 20 most confident wrong answers per run, each linked to its `vrp view` page when given."""
    rows = lake.sql(named_query("most_confident_wrong")).fetchall()
    if not rows:
        return None
    table = Table(
        "Most confident wrong answers",
        ["question", "model", "split", "answer", "label", "p(answer)"],
        [[str(q), str(m), str(sp), str(a), str(lb), _num(p)] for _r, _s, m, sp, q, a, lb, p in rows],
        "Up to 20 per run, most confident first"
        + (
            "; each question opens its page in the viewer."
            if view_href
            else " (vrp report --view DIR links them)."
        ),
    )
    if view_href:
        table.links = [view_href(r[0], r[1]) for r in rows]
    return table


#: What :func:`render` reports to its ``step`` hook, in order.
REPORT_PARTS = ("correlations", "margins", "interventions", "attribution", "figures", "tables", "pages")


def render(
    lake: Lake,
    out: Path,
    *,
    generated: str,
    n_boot: int = stats.N_BOOT,
    seed: int = stats.SEED,
    type_map: Mapping[str, str] | None = None,
    view_href: Callable[[str, str], str | None] | None = None,
    step: Callable[[str], None] | None = None,
) -> None:
    """Write report.md, report.html and figures/ for the lake into ``out`` (created).

    Each task gets its own section: the POPE table for yes/no runs, the VQA tables for open ones.
    ``view_href(run_id, sample_id)``: where a sample's `vrp view` page is, relative to ``out``.
    ``step(part)`` is called as each of :data:`REPORT_PARTS` is done (a progress bar's hook: the
    bootstraps take most of a minute on a large lake).
    """
    done = step or (lambda part: None)
    runs = (
        sorted(lake.arrow("runs").to_pylist(), key=lambda r: (r["model"], r["run_id"]))
        if lake.has_table("runs")
        else []
    )
    if not any(r.get("base_run_id") is None for r in runs):
        raise ValueError("the lake has no capture runs yet: run `vrp ingest run` first")
    h = compute.headline(lake, n_boot=n_boot, seed=seed)
    done("correlations")
    mm = compute.model_margins(lake)
    done("margins")
    by = "type_tag" if type_map is not None else "question_type"
    effects = deltas_from_lake(lake, by=by, type_map=type_map, n_boot=n_boot, seed=seed)
    done("interventions")
    tasks = {t for (t,) in lake.sql("SELECT DISTINCT coalesce(task, 'yesno') FROM samples").fetchall()}
    found = attribution.attributions(lake, n_boot=n_boot, seed=seed)
    done("attribution")
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, title, fn, arg in (
        ("probe_auroc_by_layer.png", "Probe AUROC by layer", figure_probes, h),
        ("margin_curves.png", "Margin formation by correctness", figure_margins, mm),
        ("spatial_entropy_by_layer.png", "H_s by layer", figure_entropy, compute.entropy_profiles(lake)),
    ):
        if fn(arg, figdir / name):
            figures.append((name, title))
    attribution_figure = figure_attribution(found, figdir / "attribution_by_layer.png")
    if any(e["kind"] == "destroy" and e["group"] is None for e in effects):
        destruction_curve_figure(effects, figdir / "destruction_curve.png")
        figures.append(("destruction_curve.png", "Destruction sweep"))
    figures += _causal_figures(lake, figdir)
    done("figures")
    tables = [headline_table(h, n_boot)]
    if h.fusions:
        tables.append(fusion_table(h.fusions))
    if "yesno" in tasks:
        tables.append(pope_table(lake))
    if "open" in tasks:
        tables += vqa_tables(lake, type_map)
    tables += [probe_table(h), margin_table(mm)]
    if found:
        tables.append(attribution_table(found))
        if attribution_figure:
            tables.append(("attribution_by_layer.png", "Visual attribution: Δ truth margin by layer"))
    if effects:
        tables.append(intervention_table(effects))
        if any(e["group"] is not None for e in effects):
            tables.append(intervention_table(effects, by=by))
    wrong = confident_wrong_table(lake, view_href)
    if wrong is not None:
        tables.append(wrong)
    tables += [detail_table(h), provenance_table(runs)]
    done("tables")
    title = "VRP report"
    stamp = f"{TIMESTAMP_PREFIX}{generated} from {lake.root}."
    md = [f"# {title}", "", stamp, ""]
    body = [f"<h1>{title}</h1><p>{html.escape(stamp)}</p>"]

    def add_figure(name: str, ftitle: str) -> None:
        md.extend([f"### {ftitle}", "", f"![{ftitle}](figures/{name})", ""])
        encoded = base64.b64encode((figdir / name).read_bytes()).decode()
        body.append(
            f'<h3>{html.escape(ftitle)}</h3><img alt="{html.escape(ftitle)}" '
            f'src="data:image/png;base64,{encoded}">'
        )

    for i, t in enumerate(tables):
        if isinstance(t, tuple):  # a figure placed beside its section's table
            add_figure(*t)
            continue
        md.append(t.markdown())
        body.append(t.html())
        if i == 0:
            for name, ftitle in figures:
                add_figure(name, ftitle)
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    style = (
        "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}img{max-width:100%}"
    )
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>{style}</style>'
        f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    (out / "report.html").write_text(page, encoding="utf-8")
    done("pages")


def _view_links(view: Path, report_dir: Path) -> Callable[[str, str], str | None]:
    """run_id, sample_id -> the sample's viewer page relative to the report (None if not in the view)."""
    from vrp.view import page_path

    if not (view / "index.html").is_file():
        raise ValueError(f"--view {view}: no vrp view there (write one with `vrp view --out {view}`)")
    base = Path(os.path.relpath(view.resolve(), report_dir.resolve()))

    def href(run_id: str, sample_id: str) -> str | None:
        page = page_path(run_id, sample_id)
        return (base / page).as_posix() if (view / page).is_file() else None

    return href


def write_report(
    lake_root: str,
    out_root: str | Path,
    *,
    force: bool = False,
    n_boot: int = stats.N_BOOT,
    seed: int = stats.SEED,
    now: datetime | None = None,
    type_map: Mapping[str, str] | None = None,
    view: str | Path | None = None,
    step: Callable[[str], None] | None = None,
) -> Outcome:
    """Render into ``out_root/<UTC time>/`` and point ``out_root/latest`` at it, unless nothing changed.

    ``view``: a `vrp view` folder; report rows that name a sample link to its page there.
    """
    lake = open_lake(lake_root)
    # a different type map renders different tables from the same lake
    versions = {**lake.versions(), **({"type_map": dict(type_map)} if type_map is not None else {})}
    out_root = Path(out_root)
    latest = out_root / "latest"
    previous = latest / "versions.json"
    if not force and previous.is_file():
        try:
            before = json.loads(previous.read_text(encoding="utf-8")).get("versions")
        except json.JSONDecodeError:
            before = None
        if before == versions:
            return Outcome(
                "unchanged",
                latest.resolve(),
                f"no new runs since the last report ({latest.resolve()}); use --force to render anyway",
            )
    now = now or datetime.now(UTC)
    stamp = now.strftime("%Y-%m-%dT%H%M%SZ")
    out_root.mkdir(parents=True, exist_ok=True)
    target = out_root / stamp
    k = 1
    while target.exists():
        target = out_root / f"{stamp}-{k}"
        k += 1
    tmp = out_root / f".{target.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        render(
            lake,
            tmp,
            generated=now.strftime("%Y-%m-%d %H:%M:%S UTC"),
            n_boot=n_boot,
            seed=seed,
            type_map=type_map,
            view_href=None if view is None else _view_links(Path(view), target),
            step=step,
        )
        (tmp / "versions.json").write_text(
            json.dumps({"lake": lake.root, "versions": versions}, indent=1, sort_keys=True) + "\n",
            encoding="utf-8",
        )
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    link_tmp = out_root / ".latest.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(target.name)
    os.replace(link_tmp, latest)
    return Outcome("written", target, f"report written to {target} (latest -> {target.name})")
