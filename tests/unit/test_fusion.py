"""`vrp analyze fusion` against a plain scikit-learn pipeline on the same folds; --format on every analyze."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vrp.analysis import fusion, probes
from vrp.analysis.synthetic import write_synthetic_lake
from vrp.cli import main


def _planted(n: int = 240, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.7
    x = np.column_stack(
        [
            rng.normal(size=n) + 1.2 * y,  # informative
            rng.normal(size=n) * 5 + 40,  # noise on another scale
            rng.normal(size=n) - 0.6 * y,  # informative, negative
        ]
    )
    groups = np.array([f"img{i // 4}" for i in range(n)], dtype=object)
    return x, y.astype(int), groups


def test_fusion_auroc_equals_a_plain_sklearn_pipeline_on_the_same_folds() -> None:
    x, y, groups = _planted()
    fit = fusion.fit_fusion(x, y, groups, ["a", "b", "c"], name="fusion", n_boot=200, seed=4)
    plan = probes.make_folds(y, groups, seed=4)
    oof = np.zeros(len(y))
    for train, test in plan.folds:
        assert not set(groups[train]) & set(groups[test]), "folds must be grouped by image"
        pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[train], y[train])
        oof[test] = pipe.predict_proba(x[test])[:, 1]
    assert fit.auroc == pytest.approx(roc_auc_score(y, oof), abs=1e-6)
    np.testing.assert_allclose(fit.oof, oof, atol=1e-6)
    assert fit.auroc_low <= fit.auroc <= fit.auroc_high
    assert fit.coefficients["a"] > 0 > fit.coefficients["c"]


def test_no_fold_scaler_sees_its_test_rows() -> None:
    x, y, groups = _planted()
    fit = fusion.fit_fusion(x, y, groups, ["a", "b", "c"], name="fusion", n_boot=0, seed=4)
    plan = probes.make_folds(y, groups, seed=4)
    for (train, _test), mean in zip(plan.folds, fit.fold_means, strict=True):
        np.testing.assert_allclose(mean, x[train].mean(0), rtol=1e-12)
        assert not np.allclose(mean, x.mean(0))
    # changing a fold's test rows changes nothing that fold's scaler learned
    poisoned = x.copy()
    poisoned[plan.folds[0][1]] += 1000.0
    again = fusion.fit_fusion(poisoned, y, groups, ["a", "b", "c"], name="fusion", n_boot=0, seed=4)
    np.testing.assert_allclose(again.fold_means[0], fit.fold_means[0], rtol=1e-12)


def test_usable_drops_constant_and_missing_features_then_rows() -> None:
    x = np.array([[1.0, 0.0, np.nan, 2.0], [2.0, 0.0, np.nan, np.nan], [3.0, 0.0, np.nan, 1.0]])
    sub, names, rows = fusion.usable(x, ["a", "const", "missing", "d"])
    assert names == ["a", "d"] and rows.tolist() == [True, False, True]
    np.testing.assert_array_equal(sub, [[1.0, 2.0], [3.0, 1.0]])


@pytest.fixture(scope="module")
def lake_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion") / "lake"
    write_synthetic_lake(root, models=("toy-llava",), n=120, interventions=False)
    return str(root)


def test_fusion_on_a_lake_equals_sklearn_on_its_features(lake_dir) -> None:
    from vrp.lake import open_lake

    lake = open_lake(lake_dir)
    fits, _skipped = fusion.run_fusions(lake, n_boot=100, seed=0)
    fused = next(f for f in fits if f.name == "fusion")
    x, names, meta = fusion.fusion_inputs(lake, fused.run_id, seed=0, n_boot=100)
    sub, kept, rows = fusion.usable(x, names)
    assert kept == fused.features and "best probe (out of fold)" in kept
    y, groups = meta["y"][rows], meta["groups"][rows]
    oof = np.zeros(len(y))
    for train, test in probes.make_folds(y, groups, seed=0).folds:
        pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(sub[train], y[train])
        oof[test] = pipe.predict_proba(sub[test])[:, 1]
    assert fused.auroc == pytest.approx(roc_auc_score(y, oof), abs=1e-6)
    contrib = next(f for f in fits if f.name == "logit contributions")
    assert contrib.n == fused.n


@pytest.mark.parametrize(
    "command",
    [
        ["correlations", "--no-fusion"],
        ["probes", "--no-write", "--no-mlp", "--no-neurons"],
        ["margins"],
        ["fusion"],
    ],
)
def test_every_analyze_command_speaks_csv_and_json(lake_dir, command) -> None:
    runner = CliRunner()
    base = ["analyze", *command, "--lake", lake_dir]
    if command[0] != "margins":
        base += ["--n-boot", "50"]
    as_json = runner.invoke(main, [*base, "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    records = json.loads(as_json.stdout)
    assert records and all(isinstance(r, dict) for r in records)
    as_csv = runner.invoke(main, [*base, "--format", "csv"])
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(rows) == len(records)
    assert set(rows[0]) >= set(records[0])
