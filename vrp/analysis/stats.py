"""Statistics for the study's tables, pure numpy/scipy and fast enough to bootstrap everything.

What it offers:

- ``point_biserial(score, y)``: R_pb (Pearson r with a binary y) and its two-sided p-value.
- ``fisher_ci(r, n)``: the Fisher-z interval, which the paper's published CIs match.
- ``auroc(score, y)``: Mann-Whitney AUROC with ties counted one half.
- ``correlation_table(metrics, y)``: R_pb, p, Fisher CI, percentile-bootstrap CI of R_pb and AUROC
  for many metrics of the *same* samples from one set of resamples (10,000 by default, seeded).
  A metric that does not vary is reported as constant, never as NaN.
- ``benjamini_hochberg(p)``: BH q-values; constant metrics (p = None) are not in the family.
- ``mcnemar_exact(a, b)`` and ``paired_bootstrap_diff(a, b)``: paired accuracy changes.

Why the bootstrap is written with count matrices: resampling n indices with replacement is the same
as drawing multinomial counts w (one row per resample), and then every sum the correlation needs
is a matrix product ``W @ X``. One BLAS call covers all metrics of a chunk of resamples, which is
what makes 10,000 resamples of 10 metrics x 3 models take about a second instead of a minute.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import stats as sps
from threadpoolctl import threadpool_limits

N_BOOT = 10_000
SEED = 0
LEVEL = 0.95
# Resample counts handled per chunk (rows x n): small enough to stay in cache.
_CHUNK_ELEMENTS = 250_000


@dataclass(frozen=True)
class Correlation:
    """One metric's association with correctness on one group of samples (a model or pooled).

    ``status`` is "ok", "constant" (the metric takes one value: no correlation exists, and it is
    left out of the Benjamini-Hochberg family), "constant label" (all answers right or all wrong)
    or "too few" (n < 3). Numbers are None unless status is "ok". ``direction`` is the sign that
    makes larger mean "more likely correct"; R_pb is reported on the raw metric (its sign is the
    metric's own), AUROC on ``direction * metric``.
    """

    metric: str
    group: str
    n: int
    n_correct: int
    status: str
    direction: int = 1
    r: float | None = None
    p: float | None = None
    fisher_low: float | None = None
    fisher_high: float | None = None
    boot_low: float | None = None
    boot_high: float | None = None
    auroc: float | None = None
    auroc_low: float | None = None
    auroc_high: float | None = None
    q: float | None = None
    extra: dict = field(default_factory=dict)


def _as_binary(y: Sequence | np.ndarray) -> np.ndarray:
    arr = np.asarray(y)
    if arr.dtype == bool:
        return arr.astype(np.float64)
    arr = arr.astype(np.float64)
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError("y must be binary (0/1 or bool)")
    return arr


def point_biserial(score: Sequence | np.ndarray, y: Sequence | np.ndarray) -> tuple[float, float]:
    """R_pb and its two-sided p-value (t-test with n - 2 degrees of freedom, as scipy's pearsonr).

    Raises ValueError when either variable is constant, because r is undefined there; callers that
    want a table use ``correlation_table``, which reports such metrics as constant instead.
    """
    x = np.asarray(score, dtype=np.float64)
    yy = _as_binary(y)
    n = x.size
    if n != yy.size:
        raise ValueError(f"score has {n} values but y has {yy.size}")
    if n < 3:
        raise ValueError("need at least 3 samples for a correlation")
    xc = x - x.mean()
    yc = yy - yy.mean()
    sxx = float(xc @ xc)
    syy = float(yc @ yc)
    if sxx == 0.0 or syy == 0.0:
        raise ValueError("correlation undefined: a variable is constant")
    r = float(np.clip((xc @ yc) / math.sqrt(sxx * syy), -1.0, 1.0))
    return r, _r_pvalue(r, n)


def _r_pvalue(r: float, n: int) -> float:
    if abs(r) >= 1.0:
        return 0.0
    t = r * math.sqrt((n - 2) / (1.0 - r * r))
    return float(2.0 * sps.t.sf(abs(t), n - 2))


def fisher_ci(r: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Fisher-z interval tanh(atanh(r) -/+ z / sqrt(n - 3)); the paper's abstract CIs match it."""
    if n < 4:
        return (-1.0, 1.0)
    if abs(r) >= 1.0:
        return (r, r)
    z = math.atanh(r)
    half = sps.norm.ppf(0.5 + level / 2.0) / math.sqrt(n - 3)
    return (math.tanh(z - half), math.tanh(z + half))


def auroc(score: Sequence | np.ndarray, y: Sequence | np.ndarray) -> float:
    """P(score of a correct answer > score of a wrong one), ties one half (Mann-Whitney U / n1 n0)."""
    x = np.asarray(score, dtype=np.float64)
    yy = _as_binary(y)
    n1 = yy.sum()
    n0 = yy.size - n1
    if n1 == 0 or n0 == 0:
        raise ValueError("AUROC undefined: only one class present")
    ranks = sps.rankdata(x)
    return float((ranks[yy == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def bootstrap_counts(
    n: int, n_boot: int = N_BOOT, seed: int = SEED, rows: int | None = None
) -> Iterator[np.ndarray]:
    """Yield float32 count matrices (rows = resamples, columns = samples), in chunks.

    Row b holds how often each sample was drawn in resample b (n draws with replacement), so a
    statistic's resampled sums are ``counts @ values``. Same seed, same resamples. Chunks are kept
    small (about a megabyte) because the work per chunk is memory-bound: small chunks stay in cache.
    """
    rng = np.random.default_rng(seed)
    chunk = rows or max(1, min(n_boot, _CHUNK_ELEMENTS // max(n, 1)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = rng.integers(0, n, size=(b, n), dtype=np.int64 if b * n >= 2**31 else np.int32)
        idx += (np.arange(b, dtype=idx.dtype) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float32)
        done += b


@dataclass(frozen=True)
class _Order:
    """What the resampled AUROC of one score needs, from one sort of the full sample.

    Resampling does not change the order of values, so for each positive the negatives below it
    (``left``) and at or below it (``right``, ties) are fixed positions in the sorted negatives.
    """

    negatives: np.ndarray  # indices of negatives, by ascending score
    positives: np.ndarray  # indices of positives
    left: np.ndarray  # per positive: number of negatives with a smaller score
    right: np.ndarray | None  # per positive: negatives with a smaller or equal score (None: no ties)

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> _Order:
        neg = np.flatnonzero(y == 0)
        neg = neg[np.argsort(x[neg], kind="stable")]
        pos = np.flatnonzero(y != 0)
        sorted_neg = x[neg]
        left = np.searchsorted(sorted_neg, x[pos], side="left")
        right = np.searchsorted(sorted_neg, x[pos], side="right")
        return cls(neg, pos, left, None if np.array_equal(left, right) else right)


def _weighted_auroc(counts: np.ndarray, o: _Order) -> np.ndarray:
    """AUROC of each resample (rows of counts): drawn positives x (drawn negatives below + half ties)."""
    cum = np.zeros((counts.shape[0], o.negatives.size + 1), dtype=np.float32)
    # float32 is exact here: counts and their running sums are integers below 2**24
    np.cumsum(np.take(counts, o.negatives, axis=1), axis=1, out=cum[:, 1:])
    below = np.take(cum, o.left, axis=1)
    if o.right is not None:
        below += np.take(cum, o.right, axis=1)
        below *= np.float32(0.5)
    pos = np.take(counts, o.positives, axis=1)
    num = np.einsum("ij,ij->i", pos, below, dtype=np.float64)
    den = pos.sum(axis=1, dtype=np.float64) * cum[:, -1].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def _percentile_ci(values: np.ndarray, level: float) -> tuple[float, float] | None:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(lo), float(hi)


def stream_seed(seed: int, batch: int, group: int) -> int:
    """Seed of the resamples of one group within one batch of metrics: independent streams, reproducible."""
    return (seed * 1_000_003 + batch) * 1_000_003 + group


Group = tuple[Mapping[str, Sequence | np.ndarray], Sequence | np.ndarray]


def correlation_table(
    metrics: Mapping[str, Sequence | np.ndarray],
    y: Sequence | np.ndarray,
    *,
    group: str = "all",
    directions: Mapping[str, int] | None = None,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    level: float = LEVEL,
    with_auroc_ci: bool = True,
) -> list[Correlation]:
    """R_pb, p, Fisher and bootstrap CIs, AUROC and its CI of each metric against y, one group."""
    return correlation_tables(
        {group: (metrics, y)},
        pooled=None,
        directions=directions,
        n_boot=n_boot,
        seed=seed,
        level=level,
        with_auroc_ci=with_auroc_ci,
    )


def correlation_tables(
    groups: Mapping[str, Group],
    *,
    pooled: str | None = "pooled",
    directions: Mapping[str, int] | None = None,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    level: float = LEVEL,
    with_auroc_ci: bool = True,
) -> list[Correlation]:
    """The headline statistics of each metric, per group (model) and, if ``pooled``, pooled.

    ``groups`` maps a group name to (metrics, y): metric name -> values, one per sample, aligned
    with y. NaN marks a missing value; each metric uses the samples where it is present, and
    metrics with the same missing pattern share resamples (one matrix product for all of them).
    The pooled row concatenates the groups and is bootstrapped *stratified by group*: its
    resamples are the groups' own resamples side by side, so each model keeps its n, as in the
    design of the study (a fixed number of questions per model).
    """
    directions = dict(directions or {})
    names: list[str] = []
    for metrics, _ in groups.values():
        names += [m for m in metrics if m not in names]
    gnames = list(groups)
    ys = {g: _as_binary(groups[g][1]) for g in gnames}
    # metric -> per group mask of present values; metrics with identical masks form one batch
    batches: dict[tuple, list[str]] = {}
    values: dict[tuple[str, str], np.ndarray] = {}
    for m in names:
        key = []
        for g in gnames:
            metrics, _ = groups[g]
            if m in metrics:
                x = np.asarray(metrics[m], dtype=np.float64)
                if x.size != ys[g].size:
                    raise ValueError(f"metric {m!r} of {g!r} has {x.size} values but y has {ys[g].size}")
                if np.any(np.isinf(x)):
                    raise ValueError(f"metric {m!r} of {g!r} has infinite values")
                present = ~np.isnan(x)
                values[(g, m)] = x
            else:
                present = np.zeros(ys[g].size, dtype=bool)
            key.append(present.tobytes())
        batches.setdefault(tuple(key), []).append(m)
    results: dict[tuple[str, str], Correlation] = {}
    for batch_no, batch in enumerate(batches.values()):
        sub = {}
        for g in gnames:
            present = [m for m in batch if (g, m) in values]
            if not present:
                continue
            mask = ~np.isnan(values[(g, present[0])])
            sub[g] = ({m: values[(g, m)][mask] for m in present}, ys[g][mask])
        with threadpool_limits(1):  # small products: threads cost more than they give
            results.update(
                _table(sub, batch, pooled, directions, n_boot, seed, batch_no, level, with_auroc_ci)
            )
    out = []
    for m in names:
        out += [results[(g, m)] for g in [*gnames, pooled] if (g, m) in results]
    return out


def _describe(
    name: str, group: str, x: np.ndarray, y: np.ndarray, direction: int, level: float
) -> Correlation:
    n = y.size
    base = Correlation(
        metric=name, group=group, n=n, n_correct=int(y.sum()), status="ok", direction=direction
    )
    if n < 3:
        return replace(base, status="too few")
    if base.n_correct in (0, n):
        return replace(base, status="constant label")
    if np.ptp(x) == 0.0:
        return replace(base, status="constant", extra={"value": float(x[0])})
    r, p = point_biserial(x, y)
    lo, hi = fisher_ci(r, n, level)
    return replace(base, r=r, p=p, fisher_low=lo, fisher_high=hi, auroc=auroc(direction * x, y))


def _table(
    sub: dict[str, tuple[dict[str, np.ndarray], np.ndarray]],
    batch: list[str],
    pooled: str | None,
    directions: dict[str, int],
    n_boot: int,
    seed: int,
    batch_no: int,
    level: float,
    with_auroc_ci: bool,
) -> dict[tuple[str, str], Correlation]:
    """Statistics of one batch of metrics sharing their samples, per group and pooled."""
    gnames = list(sub)
    out: dict[tuple[str, str], Correlation] = {}
    data = {g: (np.column_stack([sub[g][0][m] for m in batch]), sub[g][1]) for g in gnames}
    if pooled is not None:
        data[pooled] = (np.vstack([data[g][0] for g in gnames]), np.concatenate([data[g][1] for g in gnames]))
    for g, (x, y) in data.items():
        for j, m in enumerate(batch):
            out[(g, m)] = _describe(m, g, x[:, j], y, int(directions.get(m, 1)), level)
    if n_boot <= 0 or not any(c.status == "ok" for c in out.values()):
        return out
    # Standardise with pooled statistics: r is affine-invariant, and standardised sums do not
    # cancel catastrophically. Constant columns get scale 1 (their r is never used).
    allx = np.vstack([data[g][0] for g in gnames])
    mu = allx.mean(axis=0)
    sd = allx.std(axis=0)
    sd[sd == 0] = 1.0
    k = len(batch)
    designs, orders = {}, {}
    for g in gnames:
        x, y = data[g]
        z = (x - mu) / sd
        designs[g] = np.column_stack([z, z * z, z * y[:, None], y]).astype(np.float64)
    for g, (x, y) in data.items():
        if with_auroc_ci:
            orders[g] = [
                _Order.of(int(directions.get(m, 1)) * x[:, j], y) if out[(g, m)].status == "ok" else None
                for j, m in enumerate(batch)
            ]
    rows = max(1, _CHUNK_ELEMENTS // max(data[g][1].size for g in data))
    gens = {
        g: bootstrap_counts(data[g][1].size, n_boot, stream_seed(seed, batch_no, i), rows)
        for i, g in enumerate(gnames)
    }
    rs: dict[str, list[np.ndarray]] = {g: [] for g in data}
    aucs: dict[str, list[np.ndarray]] = {g: [] for g in data}
    for chunks in zip(*gens.values(), strict=True):
        counts = dict(zip(gnames, chunks, strict=True))
        sums = {g: counts[g].astype(np.float64) @ designs[g] for g in gnames}
        sizes = {g: data[g][1].size for g in gnames}
        if pooled is not None:
            sums[pooled] = sum(sums.values())
            sizes[pooled] = sum(sizes.values())
            if with_auroc_ci:
                counts[pooled] = np.hstack(chunks)
        for g, s in sums.items():
            s = s / sizes[g]
            mx, mxx, mxy, my = s[:, :k], s[:, k : 2 * k], s[:, 2 * k : 3 * k], s[:, 3 * k :]
            with np.errstate(invalid="ignore", divide="ignore"):
                rs[g].append((mxy - mx * my) / np.sqrt((mxx - mx * mx) * (my - my * my)))
            if with_auroc_ci:
                cols = [
                    _weighted_auroc(counts[g], o) if o is not None else np.full(len(s), np.nan)
                    for o in orders[g]
                ]
                aucs[g].append(np.column_stack(cols))
    for g in data:
        rmat = np.vstack(rs[g])
        amat = np.vstack(aucs[g]) if with_auroc_ci else None
        for j, m in enumerate(batch):
            c = out[(g, m)]
            if c.status != "ok":
                continue
            upd: dict[str, float] = {}
            ci = _percentile_ci(rmat[:, j], level)
            if ci:
                upd.update(boot_low=ci[0], boot_high=ci[1])
            if amat is not None and (aci := _percentile_ci(amat[:, j], level)):
                upd.update(auroc_low=aci[0], auroc_high=aci[1])
            out[(g, m)] = replace(c, **upd)
    return out


def auroc_ci(
    score: Sequence | np.ndarray,
    y: Sequence | np.ndarray,
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    level: float = LEVEL,
) -> tuple[float, float, float]:
    """AUROC and its percentile-bootstrap interval (used for probes' out-of-fold scores)."""
    x = np.asarray(score, dtype=np.float64)
    yy = _as_binary(y)
    point = auroc(x, yy)
    o = _Order.of(x, yy)
    vals = np.concatenate([_weighted_auroc(c, o) for c in bootstrap_counts(x.size, n_boot, seed)])
    ci = _percentile_ci(vals, level) or (float("nan"), float("nan"))
    return point, ci[0], ci[1]


def benjamini_hochberg(pvalues: Sequence[float | None]) -> list[float | None]:
    """BH-adjusted q-values (step-up, monotone, capped at 1); None stays None and is not counted.

    Leaving constant metrics out of the family matters: counting them would inflate m and make
    every other metric's q-value larger for no reason.
    """
    idx = [i for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    q: list[float | None] = [None] * len(pvalues)
    m = len(idx)
    if m == 0:
        return q
    p = np.array([pvalues[i] for i in idx], dtype=np.float64)
    order = np.argsort(p, kind="stable")
    ranked = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    adjusted = np.minimum(adjusted, 1.0)
    for pos, j in enumerate(order):
        q[idx[j]] = float(adjusted[pos])
    return q


def with_bh(rows: Sequence[Correlation]) -> list[Correlation]:
    """Fill ``q`` of each row from BH over the rows' p-values (one family: one table's metrics)."""
    qs = benjamini_hochberg([r.p if r.status == "ok" else None for r in rows])
    return [replace(r, q=q) for r, q in zip(rows, qs, strict=True)]


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of paired binary outcomes: b = right then wrong, c = wrong then right."""

    n: int
    b: int
    c: int
    p: float


def mcnemar_exact(before: Sequence | np.ndarray, after: Sequence | np.ndarray) -> McNemar:
    """Two-sided exact binomial McNemar test on the discordant pairs (as statsmodels exact=True)."""
    a = _as_binary(before).astype(bool)
    b = _as_binary(after).astype(bool)
    if a.size != b.size:
        raise ValueError(f"paired outcomes differ in length: {a.size} vs {b.size}")
    n10 = int(np.sum(a & ~b))
    n01 = int(np.sum(~a & b))
    p = min(1.0, 2.0 * float(sps.binom.cdf(min(n10, n01), n10 + n01, 0.5)))
    return McNemar(n=int(a.size), b=n10, c=n01, p=p)


def paired_bootstrap_diff(
    before: Sequence | np.ndarray,
    after: Sequence | np.ndarray,
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    level: float = LEVEL,
) -> tuple[float, float, float]:
    """Accuracy change (after - before) and its percentile-bootstrap CI, resampling *pairs*."""
    a = _as_binary(before)
    b = _as_binary(after)
    if a.size != b.size:
        raise ValueError(f"paired outcomes differ in length: {a.size} vs {b.size}")
    d = b - a
    vals = np.concatenate([c.astype(np.float64) @ d / d.size for c in bootstrap_counts(d.size, n_boot, seed)])
    lo, hi = _percentile_ci(vals, level)
    return float(d.mean()), lo, hi
