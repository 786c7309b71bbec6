"""Margin formation, lock-in and entropy deltas against hand-worked values."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from vrp.analysis import margins


def test_margin_curves_by_correctness() -> None:
    m = np.array([[0.0, 1.0, 4.0], [0.0, 3.0, 6.0], [0.0, 1.0, -2.0], [0.0, -1.0, -4.0]])
    correct = np.array([True, True, False, False])
    c = margins.margin_curves(m, correct)
    np.testing.assert_allclose(c.mean_correct, [0, 2, 5])
    np.testing.assert_allclose(c.mean_incorrect, [0, 0, -3])
    np.testing.assert_allclose(c.separation, [0, 2, 8])
    sem = [0, np.std([1, 3], ddof=1) / np.sqrt(2), np.std([4, 6], ddof=1) / np.sqrt(2)]
    np.testing.assert_allclose(c.sem_correct, sem)
    assert c.auroc[0] == 0.5  # a constant layer separates nothing
    assert c.auroc[2] == pytest.approx(roc_auc_score(correct, m[:, 2]))
    assert margins.max_separation_layer(c) == 2
    assert (c.n_correct, c.n_incorrect) == (2, 2)


def test_lock_in_is_first_layer_top_for_good() -> None:
    rank = np.array(
        [
            [3, 0, 0, 0],  # locks at 1
            [0, 2, 0, 0],  # top at 0 but loses it: locks at 2
            [5, 4, 1, 0],  # only the last layer
            [0, 0, 0, 1],  # not top at the end: never
        ]
    )
    np.testing.assert_array_equal(margins.lock_in_layers(rank), [1, 2, 3, -1])
    np.testing.assert_array_equal(
        margins.lock_in_layers(rank, layers=np.array([10, 11, 12, 13])), [11, 12, 13, -1]
    )


def test_entropy_deltas() -> None:
    h = np.array([[5.0, 3.0, 3.5], [6.0, 2.0, 3.5]])
    p = margins.entropy_deltas(h)
    np.testing.assert_allclose(p.mean, [5.5, 2.5, 3.5])
    assert np.isnan(p.delta[0])
    np.testing.assert_allclose(p.delta[1:], [-3.0, 1.0])
    assert p.sharpest_drop == 1


def test_single_class_gives_no_separation() -> None:
    c = margins.margin_curves(np.ones((3, 2)), np.array([True, True, True]))
    assert np.all(np.isnan(c.auroc))
    assert margins.max_separation_layer(c) is None
