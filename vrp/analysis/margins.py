"""Layer-wise answer formation from the logit lens and the attention maps (paper section 2.4, 2.1).

Pure numpy on sample x layer matrices (rows = samples, columns = layers 0..L-1):

- ``margin_curves(margin, correct)``: mean and standard error of a per-layer margin for correct and
  incorrect answers, their difference and the per-layer AUROC of the margin.
- ``max_separation_layer(curves)``: where the correct and incorrect means are furthest apart.
- ``lock_in_layers(rank)``: per sample, the first layer from which the logit lens's top token is
  the final answer's token at every later layer (rank 0 from there on).
- ``entropy_deltas(entropy)``: mean spatial entropy per layer and its layer-to-layer change
  (negative = the map sharpens: the paper's "early locking").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vrp.analysis.stats import auroc


@dataclass(frozen=True)
class MarginCurves:
    """Per-layer statistics of one margin split by correctness (arrays of length L)."""

    layers: np.ndarray
    mean_correct: np.ndarray
    sem_correct: np.ndarray
    mean_incorrect: np.ndarray
    sem_incorrect: np.ndarray
    separation: np.ndarray  # mean_correct - mean_incorrect
    auroc: np.ndarray  # per layer, margin as the score of "correct"; NaN when one class is empty
    n_correct: int
    n_incorrect: int


def _mean_sem(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[0]
    if n == 0:
        nan = np.full(x.shape[1], np.nan)
        return nan, nan
    sem = x.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full(x.shape[1], np.nan)
    return x.mean(axis=0), sem


def margin_curves(margin: np.ndarray, correct: np.ndarray, layers: np.ndarray | None = None) -> MarginCurves:
    """Mean +- SEM of a per-layer margin for correct and incorrect answers, and their separation."""
    m = np.asarray(margin, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    if m.ndim != 2 or m.shape[0] != c.size:
        raise ValueError(f"margin must be samples x layers with one row per answer; got {m.shape}, {c.size}")
    mc, sc = _mean_sem(m[c])
    mi, si = _mean_sem(m[~c])
    both = c.any() and (~c).any()
    aucs = np.array(
        [
            auroc(m[:, j], c) if both and np.ptp(m[:, j]) > 0 else (0.5 if both else np.nan)
            for j in range(m.shape[1])
        ]
    )
    return MarginCurves(
        layers=np.arange(m.shape[1]) if layers is None else np.asarray(layers),
        mean_correct=mc,
        sem_correct=sc,
        mean_incorrect=mi,
        sem_incorrect=si,
        separation=mc - mi,
        auroc=aucs,
        n_correct=int(c.sum()),
        n_incorrect=int((~c).sum()),
    )


def max_separation_layer(curves: MarginCurves) -> int | None:
    """Layer with the largest |mean correct - mean incorrect| (earliest on ties); None if a class is empty."""
    sep = np.abs(curves.separation)
    if not np.any(np.isfinite(sep)):
        return None
    return int(curves.layers[int(np.nanargmax(sep))])


def lock_in_layers(rank: np.ndarray, layers: np.ndarray | None = None) -> np.ndarray:
    """Per sample, the first layer from which the lens top token is the final answer's, for good.

    ``rank`` is the ``lens_answer_rank`` matrix (0 = the final answer's token is the lens's top
    token at that layer). A sample that is not top at the last layer never locks in: -1.
    """
    r = np.asarray(rank)
    top = r == 0
    # suffix-all: top at this layer and at every later one
    locked = np.flip(np.logical_and.accumulate(np.flip(top, axis=1), axis=1), axis=1)
    first = np.where(locked.any(axis=1), locked.argmax(axis=1), -1)
    if layers is None:
        return first
    lay = np.asarray(layers)
    return np.where(first >= 0, lay[np.maximum(first, 0)], -1)


@dataclass(frozen=True)
class EntropyProfile:
    """Mean spatial entropy per layer and its change from the previous layer (first change NaN)."""

    layers: np.ndarray
    mean: np.ndarray
    delta: np.ndarray

    @property
    def sharpest_drop(self) -> int | None:
        """Layer with the most negative change (where the map locks onto a region)."""
        if not np.any(np.isfinite(self.delta)):
            return None
        return int(self.layers[int(np.nanargmin(self.delta))])


def entropy_deltas(entropy: np.ndarray, layers: np.ndarray | None = None) -> EntropyProfile:
    """Mean H_s per layer over samples and Delta H_s[l] = mean H_s[l] - mean H_s[l-1]."""
    h = np.asarray(entropy, dtype=np.float64)
    mean = h.mean(axis=0)
    delta = np.r_[np.nan, np.diff(mean)]
    return EntropyProfile(
        layers=np.arange(h.shape[1]) if layers is None else np.asarray(layers), mean=mean, delta=delta
    )
