"""Held-out probes: the solver against scikit-learn, grouped folds, layer finding, controls."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from vrp.analysis import probes


def _data(n: int = 240, d: int = 32, layers: int = 4, signal_layer: int = 2, seed: int = 0):
    """Six questions per image (as POPE), label carried by one layer's direction only."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n) // 6
    y = (rng.random(n) < 0.6).astype(int)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    mats = {}
    for layer in range(layers):
        x = rng.normal(size=(n, d)) + 3.0  # an offset, as real residual streams have
        if layer == signal_layer:
            x += np.outer(y - 0.5, direction) * 3.0
        mats[layer] = x.astype(np.float32)
    return mats, y, groups


def test_folds_never_share_an_image_and_are_stratified() -> None:
    _, y, groups = _data(n=300)
    plan = probes.make_folds(y, groups)
    assert plan.n_splits == 5 and plan.note is None
    seen = np.zeros(y.size, dtype=int)
    for tr, te in plan.folds:
        assert not set(groups[tr]) & set(groups[te])
        assert set(tr) | set(te) == set(range(y.size))
        seen[te] += 1
        assert abs(y[te].mean() - y.mean()) < 0.1
    assert np.all(seen == 1)


def test_fewer_folds_when_few_images_and_said() -> None:
    y = np.array([0, 1, 0, 1, 1, 0, 1, 1, 0])
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    plan = probes.make_folds(y, groups)
    assert plan.n_splits == 3
    assert "3 folds instead of 5" in plan.note
    with pytest.raises(probes.ProbeError, match="one class"):
        probes.make_folds(np.ones(9), groups)


def test_solver_matches_sklearn_standardised_logreg() -> None:
    mats, y, groups = _data(n=200, d=40)
    x = mats[2]
    plan = probes.make_folds(y, groups)
    fit = probes.logreg_folds(x, y, plan.folds, C=0.5, tol=1e-8, max_iter=5000, threads=2)
    ref = np.empty(y.size)
    for f, (tr, te) in enumerate(plan.folds):
        sc = StandardScaler().fit(x[tr])
        clf = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(sc.transform(x[tr]), y[tr])
        ref[te] = clf.decision_function(sc.transform(x[te]))
        np.testing.assert_allclose(fit.coef[:, f], clf.coef_[0], atol=2e-3)
    np.testing.assert_allclose(fit.oof, ref, atol=5e-3)
    assert roc_auc_score(y, fit.oof) == pytest.approx(roc_auc_score(y, ref), abs=1e-3)


def test_sweep_finds_the_signal_layer_and_reports_held_out_numbers() -> None:
    mats, y, groups = _data(n=240, d=32, layers=6, signal_layer=2)
    res = probes.probe_sweep(sorted(mats), mats.__getitem__, y, groups, n_boot=300, mlp_max_iter=200)
    logreg = {r.layer: r for r in res if r.probe == "logreg"}
    assert probes.best_layer(res) == 2
    assert logreg[2].auroc > 0.9
    assert logreg[2].auroc_low < logreg[2].auroc < logreg[2].auroc_high
    assert all(abs(logreg[k].auroc - 0.5) < 0.15 for k in logreg if k != 2)
    assert roc_auc_score(y, logreg[2].scores) == pytest.approx(logreg[2].auroc)
    by_probe = {r.probe: r for r in res}
    assert by_probe["last5"].layer == 5  # layers 1..5; the signal layer is among them
    assert by_probe["last5"].auroc > 0.8
    assert by_probe["mlp"].layer == 2 and by_probe["mlp"].auroc > 0.8
    assert all(r.folds == 5 and r.n == 240 and r.n_pos == y.sum() for r in res)


def test_shuffled_labels_give_chance() -> None:
    mats, y, groups = _data(n=300, d=32, layers=3, signal_layer=1)
    rng = np.random.default_rng(1)
    aurocs = []
    for _ in range(3):
        (r,) = probes.probe_sweep([1], mats.__getitem__, rng.permutation(y), groups, n_boot=100, mlp=False)
        assert abs(r.auroc - 0.5) < 0.1
        aurocs.append(r.auroc)
    assert abs(np.mean(aurocs) - 0.5) < 0.06


def test_l1_neuron_ranking_finds_the_predictive_coordinate() -> None:
    rng = np.random.default_rng(3)
    n, d = 300, 60
    y = (rng.random(n) < 0.5).astype(int)
    x = rng.normal(size=(n, d))
    x[:, 7] += 2.0 * y
    x[:, 11] *= 0.01  # low variance: not a candidate when top_variance < d
    ranks = probes.rank_neurons_l1(x, y, top_variance=50)
    assert len(ranks) == 50
    assert ranks[0].neuron == 7 and ranks[0].rank == 1 and ranks[0].coef > 0
    assert 11 not in {r.neuron for r in ranks}
    assert [r.rank for r in ranks] == list(range(1, 51))
    # sparse: most coefficients are exactly zero at C = 0.1
    assert sum(r.coef != 0 for r in ranks) < 25


def test_l2_ranking_orders_all_coordinates_like_sklearn() -> None:
    rng = np.random.default_rng(4)
    n, d = 300, 20
    y = (rng.random(n) < 0.5).astype(int)
    x = rng.normal(size=(n, d)) + 5.0
    x[:, 3] += 1.5 * y
    x[:, 8] -= 0.7 * y
    ranks = probes.rank_neurons_l2(x, y)
    assert [r.neuron for r in ranks[:2]] == [3, 8]
    clf = LogisticRegression(max_iter=5000, tol=1e-10).fit(StandardScaler().fit_transform(x), y)
    by = {r.neuron: r.coef for r in ranks}
    np.testing.assert_allclose([by[j] for j in range(d)], clf.coef_[0], atol=5e-3)
    assert sorted(by) == list(range(d))
