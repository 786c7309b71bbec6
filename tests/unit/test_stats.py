"""Statistics of the headline table against scipy, statsmodels, sklearn and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from vrp.analysis import stats


def _sample(n: int, rho: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.6
    x = rng.normal(size=n) + rho * y
    return x, y


def test_point_biserial_matches_scipy_and_hand() -> None:
    x, y = _sample(500, 0.4)
    r, p = stats.point_biserial(x, y)
    ref = sps.pointbiserialr(y, x)
    assert r == pytest.approx(ref.statistic, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)
    # hand: r_pb = (M1 - M0) / s_n * sqrt(p q), with the population standard deviation
    m1, m0 = x[y].mean(), x[~y].mean()
    q1 = y.mean()
    hand = (m1 - m0) / x.std() * math.sqrt(q1 * (1 - q1))
    assert r == pytest.approx(hand, abs=1e-12)


def test_point_biserial_small_hand_example() -> None:
    # x = 1..4, y = 0,0,1,1: r = cov / (sx sy) = 0.5 / sqrt(1.25 * 0.25)
    r, p = stats.point_biserial([1, 2, 3, 4], [0, 0, 1, 1])
    assert r == pytest.approx(0.5 / math.sqrt(1.25 * 0.25))
    t = r * math.sqrt(2 / (1 - r * r))
    assert p == pytest.approx(2 * sps.t.sf(t, 2))


def test_fisher_ci_hand() -> None:
    lo, hi = stats.fisher_ci(0.3, 103)
    z = math.atanh(0.3)
    assert lo == pytest.approx(math.tanh(z - 1.959963984540054 / 10))
    assert hi == pytest.approx(math.tanh(z + 1.959963984540054 / 10))
    # the paper's pooled n = 3,090 with r ~ 0 gives a half-width of about 0.035
    lo, hi = stats.fisher_ci(0.001, 3090)
    assert (hi - lo) / 2 == pytest.approx(0.0353, abs=5e-4)


def test_bootstrap_ci_covers_fisher_on_large_sample() -> None:
    x, y = _sample(5000, 0.3, seed=1)
    (row,) = stats.correlation_table({"m": x}, y, n_boot=2000, seed=3)
    assert row.status == "ok"
    assert row.boot_low < row.r < row.boot_high
    assert row.boot_low == pytest.approx(row.fisher_low, abs=0.006)
    assert row.boot_high == pytest.approx(row.fisher_high, abs=0.006)
    assert row.auroc == pytest.approx(roc_auc_score(y, x))
    assert row.auroc_low < row.auroc < row.auroc_high


def test_bootstrap_equals_explicit_resampling() -> None:
    """The count-matrix bootstrap equals resampling indices and recomputing with scipy/sklearn."""
    rng = np.random.default_rng(5)
    n = 60
    y = rng.random(n) < 0.5
    x = np.round(rng.normal(size=n) + y, 1)  # ties on purpose
    n_boot = 50
    (row,) = stats.correlation_table({"m": x}, y, n_boot=n_boot, seed=7, level=0.8)
    rs, aucs = [], []
    for counts in stats.bootstrap_counts(
        n, n_boot, stats.stream_seed(7, 0, 0), rows=max(1, stats._CHUNK_ELEMENTS // n)
    ):
        for c in counts.astype(int):
            idx = np.repeat(np.arange(n), c)
            rs.append(sps.pearsonr(x[idx], y[idx]).statistic)
            aucs.append(roc_auc_score(y[idx], x[idx]))
    assert row.boot_low == pytest.approx(np.percentile(rs, 10), abs=1e-9)
    assert row.boot_high == pytest.approx(np.percentile(rs, 90), abs=1e-9)
    assert row.auroc_low == pytest.approx(np.percentile(aucs, 10), abs=1e-9)
    assert row.auroc_high == pytest.approx(np.percentile(aucs, 90), abs=1e-9)


def test_bootstrap_is_seeded() -> None:
    x, y = _sample(300, 0.2)
    a = stats.correlation_table({"m": x}, y, n_boot=500, seed=1)
    b = stats.correlation_table({"m": x}, y, n_boot=500, seed=1)
    c = stats.correlation_table({"m": x}, y, n_boot=500, seed=2)
    assert a == b
    assert a[0].boot_low != c[0].boot_low


def test_constant_metric_reported_and_left_out_of_bh() -> None:
    x, y = _sample(400, 0.5)
    x2, _ = _sample(400, 0.1, seed=9)
    rows = stats.correlation_table({"a": x, "ck": np.zeros(400), "b": x2}, y, n_boot=200)
    by = {r.metric: r for r in rows}
    assert by["ck"].status == "constant"
    assert by["ck"].r is None and by["ck"].p is None and by["ck"].extra == {"value": 0.0}
    rows = stats.with_bh(rows)
    by = {r.metric: r for r in rows}
    ref = multipletests([by["a"].p, by["b"].p], method="fdr_bh")[1]
    assert by["a"].q == pytest.approx(ref[0])
    assert by["b"].q == pytest.approx(ref[1])
    assert by["ck"].q is None
    assert all(not (isinstance(v, float) and math.isnan(v)) for r in rows for v in vars(r).values())


def test_benjamini_hochberg_matches_statsmodels() -> None:
    p = [0.001, 0.04, 0.03, 0.5, None, 0.2, 0.0001]
    q = stats.benjamini_hochberg(p)
    present = [v for v in p if v is not None]
    ref = multipletests(present, method="fdr_bh")[1]
    assert [v for v in q if v is not None] == pytest.approx(list(ref))
    assert q[4] is None


def test_pooled_row_and_missing_values() -> None:
    xa, ya = _sample(300, 0.5, seed=1)
    xb, yb = _sample(200, 0.0, seed=2)
    sc = np.where(np.arange(300) % 10 == 0, np.nan, xa * 2)
    rows = stats.correlation_tables({"A": ({"m": xa, "sc": sc}, ya), "B": ({"m": xb}, yb)}, n_boot=300)
    by = {(r.metric, r.group): r for r in rows}
    pooled = by[("m", "pooled")]
    ref = sps.pointbiserialr(np.r_[ya, yb], np.r_[xa, xb])
    assert pooled.n == 500 and pooled.r == pytest.approx(ref.statistic)
    assert by[("m", "A")].r == pytest.approx(sps.pointbiserialr(ya, xa).statistic)
    keep = ~np.isnan(sc)
    assert by[("sc", "A")].n == keep.sum()
    assert by[("sc", "A")].r == pytest.approx(sps.pointbiserialr(ya[keep], sc[keep]).statistic)
    assert ("sc", "B") not in by
    assert by[("sc", "pooled")].n == keep.sum()
    assert pooled.boot_low < pooled.r < pooled.boot_high


def test_direction_flips_auroc_not_r() -> None:
    x, y = _sample(300, -0.8)
    (row,) = stats.correlation_table({"entropy": x}, y, directions={"entropy": -1}, n_boot=200)
    assert row.r < 0
    assert row.auroc == pytest.approx(roc_auc_score(y, -x))
    assert row.auroc > 0.5


def test_auroc_ci_matches_sklearn_point() -> None:
    x, y = _sample(400, 1.0)
    point, lo, hi = stats.auroc_ci(x, y, n_boot=500)
    assert point == pytest.approx(roc_auc_score(y, x))
    assert lo < point < hi


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mcnemar_matches_statsmodels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.random(200) < 0.7
    b = np.where(rng.random(200) < 0.15, ~a, a)
    res = stats.mcnemar_exact(a, b)
    table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    ref = mcnemar(table, exact=True)
    assert res.p == pytest.approx(ref.pvalue, rel=1e-12)
    assert (res.b, res.c) == (table[0][1], table[1][0])


def test_mcnemar_no_discordant_pairs() -> None:
    assert stats.mcnemar_exact([1, 0, 1], [1, 0, 1]).p == 1.0


def test_paired_bootstrap_diff() -> None:
    rng = np.random.default_rng(3)
    a = rng.random(2000) < 0.7
    b = np.where(rng.random(2000) < 0.1, False, a)
    diff, lo, hi = stats.paired_bootstrap_diff(a, b, n_boot=2000)
    assert diff == pytest.approx(b.mean() - a.mean())
    d = b.astype(float) - a
    se = d.std() / math.sqrt(d.size)
    assert lo == pytest.approx(diff - 1.96 * se, abs=0.004)
    assert hi == pytest.approx(diff + 1.96 * se, abs=0.004)


def test_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="constant"):
        stats.point_biserial([1, 1, 1, 1], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="binary"):
        stats.point_biserial([1, 2, 3], [0, 2, 1])
    (row,) = stats.correlation_table({"m": [1.0, 2.0, 3.0, 4.0]}, [1, 1, 1, 1], n_boot=10)
    assert row.status == "constant label"
