"""DeLong's test for two correlated AUCs on the same test set (fast midrank algorithm).

Two initialisations scored on one test split give correlated AUCs: the same
patients are easy or hard for both. DeLong, DeLong and Clarke-Pearson (1988)
estimate the covariance of such AUCs from the structural components (per
positive: the fraction of negatives it outranks; per negative: the fraction
of positives that outrank it). Sun and Xu (2014) compute the components from
midranks in O(n log n) instead of the O(n^2) comparison of every pair; this
module follows their algorithm.

Written by hand because no maintained Python library offers it: scipy.stats
and statsmodels have no AUC comparison (statsmodels has ROC helpers neither),
and scikit-learn computes the AUC but no variance of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span (along the last axis)."""
    return sps.rankdata(values, method="average", axis=-1)


@dataclass(frozen=True)
class DeLong:
    """AUCs of k score sets on one test set and their DeLong covariance matrix."""

    aucs: np.ndarray
    covariance: np.ndarray
    n_positive: int
    n_negative: int


def delong(labels: np.ndarray, scores: np.ndarray) -> DeLong:
    """AUCs and covariance of ``scores`` (k, N) or (N,) against binary ``labels`` (N,).

    Sun & Xu's midrank form: with ``tz`` the midranks of all N scores, ``tx``
    those among the m positives and ``ty`` among the n negatives, the
    positives' components are ``(tz_pos - tx) / n`` and the negatives' are
    ``1 - (tz_neg - ty) / m``; the AUC is the positives' mean component.
    """
    labels = np.asarray(labels)
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    if scores.shape[1] != labels.shape[0]:
        raise ValueError(f"scores have {scores.shape[1]} columns, labels {labels.shape[0]} rows")
    if not np.all(np.isfinite(scores)):
        raise ValueError("DeLong: scores must be finite")
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"DeLong: labels must be 0/1, got values {sorted(values)}")
    positive = labels.astype(bool)
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positives and 2 negatives, got {m} and {n}")
    x, y = scores[:, positive], scores[:, ~positive]
    tx, ty = midranks(x), midranks(y)
    tz = midranks(np.concatenate([x, y], axis=1))
    v_pos = (tz[:, :m] - tx) / n
    v_neg = 1.0 - (tz[:, m:] - ty) / m
    aucs = v_pos.mean(axis=1)
    covariance = np.atleast_2d(np.cov(v_pos)) / m + np.atleast_2d(np.cov(v_neg)) / n
    return DeLong(aucs, covariance, m, n)


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict[str, float]:
    """Paired comparison of two AUCs on the same cases: difference, its SE, z and two-sided p."""
    result = delong(labels, np.vstack([scores_a, scores_b]))
    cov = result.covariance
    diff = float(result.aucs[0] - result.aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 0:
        p = 1.0 if diff == 0 else 0.0
        return {"auc_a": float(result.aucs[0]), "auc_b": float(result.aucs[1]),
                "diff": diff, "se": 0.0, "z": math.nan, "p": p}  # fmt: skip
    z = diff / math.sqrt(var)
    return {
        "auc_a": float(result.aucs[0]),
        "auc_b": float(result.aucs[1]),
        "diff": diff,
        "se": math.sqrt(var),
        "z": z,
        "p": float(2 * sps.norm.sf(abs(z))),
    }
