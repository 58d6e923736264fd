"""analysis.comparisons: the paired default holds alpha and beats Welch on seed-correlated data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from medssl.analysis.comparisons import compare, tost, wilcoxon_min_p

SEEDS = 10


def _pair(rng: np.random.Generator, effect: float) -> tuple[pd.Series, pd.Series]:
    """Two inits whose runs of one seed share the subset effect (sd 0.03) over noise 0.005."""
    subset = rng.normal(0, 0.03, SEEDS)
    a = 0.8 + subset + rng.normal(0, 0.005, SEEDS)
    b = 0.8 + effect + subset + rng.normal(0, 0.005, SEEDS)
    index = pd.Index(range(SEEDS), name="seed")
    return pd.Series(a, index=index), pd.Series(b, index=index)


def _rejections(test: str, effect: float, reps: int = 300) -> float:
    rng = np.random.default_rng(42)
    hits = 0
    for _ in range(reps):
        a, b = _pair(rng, effect)
        hits += compare(b, a, test).p_two_sided < 0.05
    return hits / reps


def test_paired_holds_alpha_under_the_null() -> None:
    assert 0.02 <= _rejections("paired", 0.0) <= 0.09


def test_paired_gains_power_over_welch_on_correlated_runs() -> None:
    paired, welch = _rejections("paired", 0.008), _rejections("welch", 0.008)
    assert paired >= 0.8
    assert welch <= 0.2


def test_estimates_and_p_values_equal_scipy() -> None:
    rng = np.random.default_rng(0)
    a, b = _pair(rng, 0.01)
    c = compare(b, a, "paired")
    assert c.p_two_sided == pytest.approx(sps.ttest_rel(b, a).pvalue, rel=1e-12)
    assert c.p_less == pytest.approx(sps.ttest_rel(b, a, alternative="less").pvalue, rel=1e-12)
    w = compare(b, a, "welch")
    assert w.p_two_sided == pytest.approx(sps.ttest_ind(b, a, equal_var=False).pvalue, rel=1e-12)
    res = sps.ttest_ind(b, a, equal_var=False)
    low, high = res.confidence_interval(0.95)
    assert (w.ci_low, w.ci_high) == (pytest.approx(low), pytest.approx(high))


def test_paired_without_shared_seeds_falls_back_to_welch_with_a_note() -> None:
    a = pd.Series([0.8, 0.81, 0.82], index=[0, 1, 2])
    b = pd.Series([0.7, 0.72, 0.71], index=[3, 4, 5])
    c = compare(b, a, "paired")
    assert c.test == "welch" and "Welch's test instead of the paired one" in c.notes[0]


def test_tost_passes_inside_and_fails_at_the_margin() -> None:
    rng = np.random.default_rng(3)
    at_margin = 0
    reps = 300
    for _ in range(reps):
        a, b = _pair(rng, 0.01)  # true difference exactly the margin
        at_margin += tost(compare(b, a, "paired"), 0.01) < 0.05
    assert at_margin / reps <= 0.07  # TOST's size at the boundary is alpha
    a, b = _pair(np.random.default_rng(4), 0.0)
    assert tost(compare(b, a, "paired"), 0.01) < 0.05
    assert math.isnan(tost(compare(b, a, "paired"), 0.0))


def test_wilcoxon_smallest_p() -> None:
    assert wilcoxon_min_p(5) == pytest.approx(0.0625)
    x = pd.Series(np.arange(5.0) + 1)
    y = pd.Series(np.zeros(5))
    assert compare(x, y, "wilcoxon").p_two_sided == pytest.approx(wilcoxon_min_p(5))
