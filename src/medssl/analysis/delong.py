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

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

log = logging.getLogger(__name__)


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


DELONG_COLUMNS: tuple[str, ...] = ("delong_diff", "delong_se", "p_delong_vs_ref")
"""summary.csv columns added by ``stats.delong`` (NaN where the test does not apply)."""


def seed_ensemble(
    runs: Sequence[Mapping[str, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_index, labels, mean positive-class score) over a cell's runs of a binary task.

    Every run of a task is scored on the same test rows; a run whose rows differ
    cannot be paired and is an error naming the mismatch.
    """
    first = runs[0]
    index = np.asarray(first["sample_index"])
    order = np.argsort(index, kind="stable")
    scores = []
    for run in runs:
        rows = np.asarray(run["sample_index"])
        if not np.array_equal(np.sort(rows), index[order]):
            raise ValueError(
                "runs of one cell were scored on different test rows; cannot pair them"
            )
        run_scores = np.asarray(run["scores"], dtype=float)
        run_scores = run_scores[:, -1] if run_scores.ndim == 2 else run_scores
        scores.append(run_scores[np.argsort(rows, kind="stable")])
    labels = np.asarray(first["labels"])[order]
    return index[order], labels, np.mean(scores, axis=0)


def add_delong_vs_reference(
    summary: pd.DataFrame,
    predictions: Mapping[tuple[str, str, float], Sequence[Mapping[str, np.ndarray]]],
    reference: str | None,
) -> pd.DataFrame:
    """summary.csv with DeLong's paired test of each init's AUC against the reference's.

    The two inits' seed-averaged test scores are compared on the shared test
    split (:func:`delong_test`): the test says whether the AUCs differ beyond
    what sampling *test cases* explains, which the seed intervals do not
    cover. It applies to binary tasks' ``auc`` rows; every other row keeps NaN,
    and a row that got the test says so in ``notes``.
    """
    out = summary.copy()
    for column in DELONG_COLUMNS:
        out[column] = math.nan
    if reference is None:
        log.warning("stats.delong needs stats.reference; no DeLong test was made")
        return out
    note = "p_delong_vs_ref: DeLong on seed-averaged test scores (test-set variance only)"
    for index, row in out.iterrows():
        if row["metric"] != "auc" or row["init"] == reference:
            continue
        key = (str(row["task"]), str(row["init"]), float(row["fraction"]))
        ref_key = (key[0], reference, key[2])
        runs, ref_runs = predictions.get(key), predictions.get(ref_key)
        if not runs or not ref_runs or not _binary(runs[0]):
            continue
        rows, labels, scores = seed_ensemble(runs)
        ref_rows, _, ref_scores = seed_ensemble(ref_runs)
        if not np.array_equal(rows, ref_rows) or len(np.unique(labels)) < 2:
            continue
        result = delong_test(labels, scores, ref_scores)
        out.loc[index, list(DELONG_COLUMNS)] = [result["diff"], result["se"], result["p"]]
        notes = str(row.get("notes") or "")
        out.loc[index, "notes"] = f"{notes}; {note}" if notes else note
    return out


def _binary(run: Mapping[str, np.ndarray]) -> bool:
    """Whether a run's predictions are one positive-class score per case over 0/1 labels."""
    scores = np.asarray(run["scores"])
    one_score = scores.ndim == 1 or (scores.ndim == 2 and scores.shape[1] <= 2)
    return one_score and set(np.unique(run["labels"]).tolist()) <= {0, 1}
