"""Visual attribution: what each layer's truth margin owes to the image (image run minus condition run).

The study's Δmargin_l = margin_l(image) - margin_l(without image), averaged over questions; its argmax
is the *peak visual layer*. At the peak, the study splits the image run's residual update into its MLP
and attention parts through their direct contributions to the truth logit (``layers.attn_contrib`` /
``layers.mlp_contrib``): MLP% = sum |MLP| / (sum |MLP| + sum |attention|) over a set of layers (the
peak alone, the boosting layers where the mean Δmargin is positive, the suppression layers where it is
negative, all layers). Beside it: how often the answer flips without the image, the first-token
KL(image || condition), and the share of answers that stay the same without the image (answers the
language prior alone produces), per question type where the dataset has them, else per split.

Every function here is pure (numpy in, numbers out); :func:`attribution` reads one image run and
one of its condition runs from the lake.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vrp.analysis import stats
from vrp.lake import Lake

GROUPS = ("all", "correct", "wrong")


@dataclass(frozen=True)
class MeanCI:
    """Per layer: mean over questions with a percentile bootstrap CI, and the number of questions."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: int


def mean_ci(values: np.ndarray, *, n_boot: int = stats.N_BOOT, seed: int = stats.SEED) -> MeanCI:
    """Column means of ``values`` [questions, layers] with percentile bootstrap 95% CIs (resampling rows)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    mean = values.mean(axis=0) if n else np.full(values.shape[1], np.nan)
    if n < 2 or n_boot == 0:
        return MeanCI(mean, np.full_like(mean, np.nan), np.full_like(mean, np.nan), n)
    parts = [counts.astype(np.float64) @ values / n for counts in stats.bootstrap_counts(n, n_boot, seed)]
    boot = np.vstack(parts)
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    return MeanCI(mean, low, high, n)


def delta_by_layer(
    margin_image: np.ndarray,
    margin_condition: np.ndarray,
    correct: np.ndarray,
    *,
    n_boot: int = stats.N_BOOT,
    seed: int = stats.SEED,
) -> dict[str, MeanCI]:
    """Mean Δ truth margin per layer (image minus condition) for all, correct and wrong image answers."""
    delta = np.asarray(margin_image, dtype=np.float64) - np.asarray(margin_condition, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    masks = {"all": np.ones(len(delta), dtype=bool), "correct": correct, "wrong": ~correct}
    return {
        group: mean_ci(delta[mask], n_boot=n_boot, seed=stats.stream_seed(seed, 0, i))
        for i, (group, mask) in enumerate(masks.items())
    }


def peak_layer(mean_delta: np.ndarray, layers: Sequence[int]) -> int:
    """The peak visual layer: the layer of the largest mean Δ truth margin (the first one on ties)."""
    return int(np.asarray(layers)[int(np.nanargmax(mean_delta))])


def mlp_shares(
    attn_contrib: np.ndarray, mlp_contrib: np.ndarray, mean_delta: np.ndarray, peak_index: int
) -> dict[str, float]:
    """The study's MLP% over layer sets: sum_l mean|MLP_l| / (sum_l mean|MLP_l| + sum_l mean|attn_l|).

    ``attn_contrib``/``mlp_contrib`` [questions, layers] are the image run's direct contributions to
    the truth logit; the sets are the peak layer, the boosting layers (mean Δ > 0), the suppression
    layers (mean Δ < 0) and all layers. A set without layers (or without contribution) gives NaN.
    """
    a = np.abs(np.asarray(attn_contrib, dtype=np.float64)).mean(axis=0)
    m = np.abs(np.asarray(mlp_contrib, dtype=np.float64)).mean(axis=0)
    d = np.asarray(mean_delta, dtype=np.float64)
    peak = np.zeros(d.size, dtype=bool)
    peak[peak_index] = True
    sets = {"peak": peak, "boosting": d > 0, "suppression": d < 0, "all": np.ones(d.size, dtype=bool)}
    out = {}
    for name, chosen in sets.items():
        total = m[chosen].sum() + a[chosen].sum()
        out[name] = float(m[chosen].sum() / total) if chosen.any() and total > 0 else float("nan")
    return out


def flip_rate(image_answers: Sequence[str | None], condition_answers: Sequence[str | None]) -> float:
    """Share of questions whose parsed answer differs between the conditions (both parsed)."""
    pairs = [(a, b) for a, b in zip(image_answers, condition_answers, strict=True) if a and b]
    return float(np.mean([a != b for a, b in pairs])) if pairs else float("nan")


def unchanged_share(
    image_answers: Sequence[str | None], condition_answers: Sequence[str | None], keys: Sequence[str]
) -> dict[str, tuple[float, int]]:
    """Per key (split or question type): (share of parsed answers unchanged without the image, n)."""
    by_key: dict[str, list[bool]] = defaultdict(list)
    for a, b, key in zip(image_answers, condition_answers, keys, strict=True):
        if a and b:
            by_key[key].append(a == b)
    return {key: (float(np.mean(v)), len(v)) for key, v in sorted(by_key.items())}


@dataclass
class Attribution:
    """One image run against one of its condition runs."""

    model: str
    condition: str
    run_id: str
    condition_run_id: str
    layers: np.ndarray
    delta: dict[str, MeanCI]
    peak: int
    shares: dict[str, float]
    flip_rate: float
    mean_kl: float
    unchanged: dict[str, tuple[float, int]] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One flat row per layer (the machine-readable form of the table)."""
        out = []
        for j, layer in enumerate(self.layers.tolist()):
            row: dict = {
                "model": self.model,
                "condition": self.condition,
                "run_id": self.run_id,
                "condition_run_id": self.condition_run_id,
                "layer": layer,
                "peak": layer == self.peak,
            }
            for group in GROUPS:
                d = self.delta[group]
                row |= {
                    f"delta_{group}": _f(d.mean[j]),
                    f"delta_{group}_low": _f(d.low[j]),
                    f"delta_{group}_high": _f(d.high[j]),
                    f"n_{group}": d.n,
                }
            out.append(row)
        return out

    def summary(self) -> dict:
        """The per-pair numbers: peak, MLP shares, flip rate, KL and unchanged shares."""
        return {
            "model": self.model,
            "condition": self.condition,
            "run_id": self.run_id,
            "condition_run_id": self.condition_run_id,
            "peak_layer": self.peak,
            "peak_delta": _f(self.delta["all"].mean[list(self.layers).index(self.peak)]),
            **{f"mlp_share_{k}": _f(v) for k, v in self.shares.items()},
            "flip_rate": _f(self.flip_rate),
            "mean_first_token_kl": _f(self.mean_kl),
            "n": self.delta["all"].n,
            **{f"unchanged_{k}": _f(v) for k, (v, _n) in self.unchanged.items()},
        }


def _f(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def condition_runs(lake: Lake, models: Sequence[str] | None = None, conditions: Sequence[str] | None = None):
    """`runs` rows of condition runs (kind in CONDITION_KINDS) whose image run is in the lake."""
    from vrp.schema import CONDITION_KINDS

    if not lake.has_table("runs"):
        return []
    runs = lake.arrow("runs").to_pylist()
    ids = {r["run_id"] for r in runs}
    rows = [r for r in runs if r.get("kind") in CONDITION_KINDS and r.get("base_run_id") in ids]
    if models:
        rows = [r for r in rows if r["model"] in models]
    if conditions:
        rows = [r for r in rows if r["kind"] in conditions]
    return sorted(rows, key=lambda r: (r["model"], r["kind"], r["run_id"]))


def _layer_matrix(lake: Lake, run_id: str, columns: Sequence[str], sample_ids: Sequence[str]):
    t = lake.arrow("layers", filter={"run_id": run_id}, columns=["sample_id", "layer", *columns]).to_pylist()
    layers = sorted({r["layer"] for r in t})
    pos = {s: i for i, s in enumerate(sample_ids)}
    col = {layer: j for j, layer in enumerate(layers)}
    out = {c: np.full((len(sample_ids), len(layers)), np.nan) for c in columns}
    for r in t:
        i = pos.get(r["sample_id"])
        if i is None:
            continue
        for c in columns:
            if r[c] is not None:
                out[c][i, col[r["layer"]]] = r[c]
    return np.array(layers, dtype=int), out


def attribution(
    lake: Lake, condition_run: dict, *, n_boot: int = stats.N_BOOT, seed: int = stats.SEED
) -> Attribution | None:
    """Attribution of one condition run against its image run, over questions scored in the image run.

    None when the two runs share no scored question with a complete logit lens.
    """
    base_id, cond_id = condition_run["base_run_id"], condition_run["run_id"]
    cols = ["sample_id", "split", "question_type", "answer", "correct", "parse_status"]
    image = {
        r["sample_id"]: r for r in lake.arrow("samples", filter={"run_id": base_id}, columns=cols).to_pylist()
    }
    cond = {
        r["sample_id"]: r
        for r in lake.arrow(
            "samples", filter={"run_id": cond_id}, columns=["sample_id", "answer", "first_token_kl"]
        ).to_pylist()
    }
    ids = sorted(
        s
        for s, r in image.items()
        if s in cond and r["correct"] is not None and r["parse_status"] != "unknown"
    )
    if not ids:
        return None
    layers, img = _layer_matrix(lake, base_id, ["lens_truth_margin", "attn_contrib", "mlp_contrib"], ids)
    layers_c, con = _layer_matrix(lake, cond_id, ["lens_truth_margin"], ids)
    if layers.size == 0 or not np.array_equal(layers, layers_c):
        return None
    ok = ~(np.isnan(img["lens_truth_margin"]).any(1) | np.isnan(con["lens_truth_margin"]).any(1))
    if not ok.any():
        return None
    ids = [s for s, keep in zip(ids, ok, strict=True) if keep]
    correct = np.array([bool(image[s]["correct"]) for s in ids])
    delta = delta_by_layer(
        img["lens_truth_margin"][ok], con["lens_truth_margin"][ok], correct, n_boot=n_boot, seed=seed
    )
    peak = peak_layer(delta["all"].mean, layers)
    contrib_ok = ~(np.isnan(img["attn_contrib"][ok]).any(1) | np.isnan(img["mlp_contrib"][ok]).any(1))
    shares = mlp_shares(
        img["attn_contrib"][ok][contrib_ok],
        img["mlp_contrib"][ok][contrib_ok],
        delta["all"].mean,
        int(np.flatnonzero(layers == peak)[0]),
    )
    image_answers = [image[s]["answer"] for s in ids]
    cond_answers = [cond[s]["answer"] for s in ids]
    kls = [cond[s]["first_token_kl"] for s in ids if cond[s]["first_token_kl"] is not None]
    return Attribution(
        model=condition_run["model"],
        condition=condition_run["kind"],
        run_id=base_id,
        condition_run_id=cond_id,
        layers=layers,
        delta=delta,
        peak=peak,
        shares=shares,
        flip_rate=flip_rate(image_answers, cond_answers),
        mean_kl=float(np.mean(kls)) if kls else float("nan"),
        unchanged=unchanged_share(image_answers, cond_answers, [_group(image[s]) for s in ids]),
    )


def _group(row: dict) -> str:
    """What language-prior answers are counted per: the question type where the dataset has one
    (VQAv2), else the split (POPE's random / popular / adversarial)."""
    return row.get("question_type") or row.get("split") or "all"


def attributions(
    lake: Lake,
    *,
    models: Sequence[str] | None = None,
    conditions: Sequence[str] | None = None,
    n_boot: int = stats.N_BOOT,
    seed: int = stats.SEED,
) -> list[Attribution]:
    """Every (image run, condition run) pair in the lake, optionally for some models / conditions."""
    out = []
    for run in condition_runs(lake, models, conditions):
        got = attribution(lake, run, n_boot=n_boot, seed=seed)
        if got is not None:
            out.append(got)
    return out
