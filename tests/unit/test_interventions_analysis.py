"""Intervention analysis (no model): paired deltas against hand-worked values and scipy, the curve figure."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import stats as sps

from vrp.analysis.interventions import deltas_from_lake, destruction_curve_figure, intervention_deltas
from vrp.lake import open_lake

N = 40


def _outcomes() -> tuple[np.ndarray, np.ndarray]:
    """Reference right on 30 of 40, the condition right on 22: 10 right->wrong, 2 wrong->right."""
    before = np.array([True] * 30 + [False] * 10)
    after = before.copy()
    after[:10] = False  # right -> wrong
    after[30:32] = True  # wrong -> right
    return before, after


def _rows(run_id: str, condition: str, level: float, correct: np.ndarray, **extra) -> list[dict]:
    return [
        {
            "run_id": run_id,
            "model": "toy",
            "base_run_id": "base",
            "kind": "mask",
            "setting": "ratio=0.3,layer=1,seed=0",
            "sample_id": f"s{i:03d}",
            "condition": condition,
            "level": level,
            "correct": bool(c),
            "yes_no_margin": float(i % 5) - (1.0 if condition != "full" else 0.0),
            **extra,
        }
        for i, c in enumerate(correct)
    ]


def _independent_bootstrap(
    before: np.ndarray, after: np.ndarray, n_boot: int = 10_000
) -> tuple[float, float]:
    rng = np.random.default_rng(123)
    idx = rng.integers(0, before.size, size=(n_boot, before.size))
    diffs = after[idx].mean(axis=1) - before[idx].mean(axis=1)
    return tuple(np.percentile(diffs, [2.5, 97.5]))


def test_delta_against_full_matches_hand_worked_values_and_scipy() -> None:
    before, after = _outcomes()
    rows = _rows("r1", "full", 0.0, before) + _rows("r1", "high", 0.3, after)
    (result,) = intervention_deltas(rows)
    assert (result["condition"], result["level"], result["reference"], result["n"]) == (
        "high",
        0.3,
        "full",
        N,
    )
    assert result["acc_ref"] == pytest.approx(30 / 40) and result["acc"] == pytest.approx(22 / 40)
    assert result["delta"] == pytest.approx(-8 / 40)
    assert (result["b"], result["c"]) == (10, 2)
    assert result["p"] == pytest.approx(sps.binomtest(2, 12, 0.5).pvalue)
    low, high = _independent_bootstrap(before.astype(float), after.astype(float))
    assert result["ci_low"] == pytest.approx(low, abs=0.03) and result["ci_high"] == pytest.approx(
        high, abs=0.03
    )
    assert result["ci_low"] < result["delta"] < result["ci_high"] < 0
    assert result["margin"] == pytest.approx(result["margin_ref"] - 1.0)


def test_baseline_reference_groups_and_unknown_answers() -> None:
    before, after = _outcomes()
    rows = _rows("r2", "probe", 5.0, after)
    rows[35]["correct"] = None  # an unparsable answer counts as wrong (it was wrong before too)
    baseline = [
        {
            "run_id": "base",
            "sample_id": f"s{i:03d}",
            "correct": bool(c),
            "split": "random" if i % 2 else "adversarial",
        }
        for i, c in enumerate(before)
    ]
    results = intervention_deltas(rows, baseline, by="split", n_boot=2000)
    assert [r["group"] for r in results] == [None, "adversarial", "random"]
    overall, adversarial, random_split = results
    assert overall["reference"] == "baseline" and overall["delta"] == pytest.approx(-8 / 40)
    even = np.arange(N) % 2 == 0
    assert adversarial["n"] == 20
    assert adversarial["delta"] == pytest.approx(after[even].mean() - before[even].mean())
    assert random_split["delta"] == pytest.approx(after[~even].mean() - before[~even].mean())
    assert intervention_deltas(rows) == [], "no full condition and no baseline: nothing to pair"


def test_deltas_from_lake_and_destruction_curve(tmp_path) -> None:
    before, after = _outcomes()
    lake = open_lake(tmp_path / "lake")
    base = {"run_id": "base", "model": "toy", "dataset": "shapes-pope", "config": {"hidden_size": 4}}
    writer = lake.writer(base)
    writer.begin()
    writer.commit(
        {
            "samples": [
                {"sample_id": f"s{i:03d}", "dataset": "shapes-pope", "correct": bool(c)}
                for i, c in enumerate(before)
            ]
        }
    )
    run = {**base, "run_id": "d1", "kind": "destroy", "base_run_id": "base"}
    writer = lake.writer(run)
    writer.begin()
    rows = (
        _rows("d1", "full", 0.0, before)
        + _rows("d1", "probe", 0.25, after)
        + _rows("d1", "probe", 0.5, ~before)
    )
    for row in rows:
        row.update(kind="destroy", setting="layer=1,order=probe,seed=0")
    writer.commit(
        {
            "interventions": rows,
            "samples": [{"sample_id": f"s{i:03d}", "dataset": "shapes-pope"} for i in range(N)],
        }
    )
    results = deltas_from_lake(open_lake(tmp_path / "lake"), n_boot=1000)
    assert [(r["level"], r["acc"]) for r in results] == [(0.25, 22 / 40), (0.5, 10 / 40)]
    assert all(r["reference"] == "full" and r["acc_ref"] == 30 / 40 for r in results)

    path = destruction_curve_figure(results, tmp_path / "fig" / "destroy.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 400
    with pytest.raises(ValueError, match="no destroy rows"):
        destruction_curve_figure([{**results[0], "kind": "mask"}], tmp_path / "none.png")
