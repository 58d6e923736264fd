"""analysis.delong: the fast midrank algorithm equals the O(n^2) structural components."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from medssl.analysis.delong import delong, delong_test


def _slow_delong(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) by definition: psi over every positive-negative pair."""
    pos, neg = scores[:, labels == 1], scores[:, labels == 0]
    m, n = pos.shape[1], neg.shape[1]
    k = scores.shape[0]
    v10 = np.zeros((k, m))
    v01 = np.zeros((k, n))
    for r in range(k):
        for i in range(m):
            for j in range(n):
                psi = 1.0 if pos[r, i] > neg[r, j] else 0.5 if pos[r, i] == neg[r, j] else 0.0
                v10[r, i] += psi / n
                v01[r, j] += psi / m
    aucs = v10.mean(axis=1)
    s10 = np.cov(v10)
    s01 = np.cov(v01)
    return aucs, s10 / m + s01 / n


def test_fast_equals_structural_components_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    a = np.round(labels + rng.normal(0, 1.0, 60), 1)  # rounded: ties on purpose
    b = np.round(0.5 * labels + rng.normal(0, 1.0, 60), 1)
    fast = delong(labels, np.vstack([a, b]))
    aucs, cov = _slow_delong(labels, np.vstack([a, b]))
    np.testing.assert_allclose(fast.aucs, aucs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fast.covariance, cov, rtol=0, atol=1e-12)


def test_paired_test_statistic() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 80)
    a = labels + rng.normal(0, 0.7, 80)
    b = labels + rng.normal(0, 1.5, 80)
    aucs, cov = _slow_delong(labels, np.vstack([a, b]))
    z = (aucs[0] - aucs[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    result = delong_test(labels, a, b)
    assert result["z"] == pytest.approx(z)
    assert result["p"] == pytest.approx(2 * sps.norm.sf(abs(z)))


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="at least 2 positives"):
        delong(np.array([1, 0, 0, 0]), np.array([0.9, 0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="0/1"):
        delong(np.array([2, 0, 2, 0]), np.array([0.9, 0.1, 0.2, 0.3]))


def _runs(labels: np.ndarray, signal: float, seeds: int, rng: np.random.Generator) -> list[dict]:
    """Runs of one cell on one shared test split, rows in a different order per run."""
    runs = []
    for _ in range(seeds):
        order = rng.permutation(len(labels))
        scores = 1 / (1 + np.exp(-(signal * labels + rng.normal(size=len(labels)))))
        runs.append({"sample_index": order, "labels": labels[order], "scores": scores[order]})
    return runs


def test_delong_against_the_reference_separates_a_better_init_on_the_test_set() -> None:
    import pandas as pd

    from medssl.analysis.delong import add_delong_vs_reference, seed_ensemble

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    predictions = {
        ("t", "good", 1.0): _runs(labels, 3.0, 3, rng),
        ("t", "same", 1.0): _runs(labels, 0.5, 3, rng),
        ("t", "scratch", 1.0): _runs(labels, 0.5, 3, rng),
    }
    summary = pd.DataFrame(
        [
            {"task": "t", "metric": metric, "fraction": 1.0, "init": init, "notes": ""}
            for init in ("good", "same", "scratch")
            for metric in ("auc", "accuracy")
        ]
    )
    out = add_delong_vs_reference(summary, predictions, "scratch").set_index(["init", "metric"])
    assert out.loc[("good", "auc"), "p_delong_vs_ref"] < 1e-6
    assert out.loc[("good", "auc"), "delong_diff"] > 0.2
    assert out.loc[("same", "auc"), "p_delong_vs_ref"] > 0.01
    assert np.isnan(out.loc[("good", "accuracy"), "p_delong_vs_ref"])  # AUC rows only
    assert np.isnan(out.loc[("scratch", "auc"), "p_delong_vs_ref"])  # not against itself
    assert "DeLong" in out.loc[("good", "auc"), "notes"]
    # The ensemble is aligned by test row, whatever order each run wrote them in.
    rows, aligned, _ = seed_ensemble(predictions[("t", "good", 1.0)])
    assert np.array_equal(rows, np.arange(400)) and np.array_equal(aligned, labels)
