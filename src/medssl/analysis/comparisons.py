"""Two-group comparisons as estimates with intervals: paired, Welch, Student, Wilcoxon, TOST.

Every comparison of the statistics stage goes through :func:`compare`, which
returns one :class:`Comparison`: the difference of means (first minus
second), its standard error, degrees of freedom, confidence interval, the
two-sided p-value and the one-sided p-value "the first is worse". Tables
report the difference and its interval, not only a p-value, so a reader sees
how large a difference could be; the equivalence test (:func:`tost`) and the
comparison with the best (:mod:`medssl.analysis.statistics`) are built on the
same numbers.

The t-based comparisons are computed from summary statistics (mean, variance,
n of each group, or of the paired differences) so that our runs and published
tables (mean, std, n) go through the same arithmetic; their p-values equal
``scipy.stats.ttest_ind`` / ``ttest_rel`` to rounding.

Why paired is the default: one fine-tune seed fixes the training subset (and
the split) for every initialisation, so two inits' runs of one seed share a
large part of their noise. Differences within a seed remove it; Welch treats
the two groups as independent and loses that power.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special
from scipy import stats as sps

from medssl.core.registry import Registry


@dataclass(frozen=True)
class Comparison:
    """One comparison of group A with group B (difference = mean A - mean B)."""

    estimate: float
    se: float
    df: float
    ci_low: float
    ci_high: float
    p_two_sided: float
    p_less: float
    """One-sided p-value of "A's mean is below B's" (small: A is lower)."""
    p_greater: float
    """One-sided p-value of "A's mean is above B's" (small: A is higher)."""
    test: str
    """Registry name of the test actually used (a paired request can fall back to welch)."""
    n_pairs: int = 0
    notes: tuple[str, ...] = ()


NAN_COMPARISON = Comparison(*([math.nan] * 8), "")


def finite(values: pd.Series | np.ndarray | list[float]) -> np.ndarray:
    """The finite values as a float array (NaN runs are not runs)."""
    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]


def from_t(
    estimate: float, se: float, df: float, confidence: float, test: str, **extra
) -> Comparison:
    """A comparison from a difference, its standard error and degrees of freedom.

    NaN p-values and interval where the test is undefined (se zero or not
    finite, df < 1): a zero-variance comparison says nothing about seeds.
    """
    if not (math.isfinite(estimate) and math.isfinite(se) and math.isfinite(df)) or df < 1:
        nan = math.nan
        return Comparison(estimate, se, df, nan, nan, nan, nan, nan, test, **extra)
    if se == 0:
        notes = (*extra.pop("notes", ()), "zero variance: no test possible")
        return Comparison(
            estimate, se, df, estimate, estimate, *([math.nan] * 3), test, notes=notes, **extra
        )
    # scipy.special's Student t functions directly: the same values as
    # scipy.stats.t's methods, without their argument checks (thousands of calls).
    t = estimate / se
    half = float(special.stdtrit(df, (1 + confidence) / 2)) * se
    return Comparison(
        estimate,
        se,
        df,
        estimate - half,
        estimate + half,
        float(2 * special.stdtr(df, -abs(t))),
        float(special.stdtr(df, t)),
        float(special.stdtr(df, -t)),
        test,
        **extra,
    )


def welch_from_stats(
    mean1: float, var1: float, n1: int, mean2: float, var2: float, n2: int, confidence: float
) -> Comparison:
    """Welch's unequal-variance t comparison from means, sample variances and sizes."""
    if n1 < 2 or n2 < 2:
        return NAN_COMPARISON
    a, b = var1 / n1, var2 / n2
    se = math.sqrt(a + b)
    df = (a + b) ** 2 / (a**2 / (n1 - 1) + b**2 / (n2 - 1)) if a + b > 0 else float(n1 + n2 - 2)
    return from_t(mean1 - mean2, se, df, confidence, "welch")


def student_from_stats(
    mean1: float, var1: float, n1: int, mean2: float, var2: float, n2: int, confidence: float
) -> Comparison:
    """Student's pooled-variance t comparison from means, sample variances and sizes."""
    if n1 < 2 or n2 < 2:
        return NAN_COMPARISON
    df = n1 + n2 - 2
    pooled = ((n1 - 1) * var1 + (n2 - 1) * var2) / df
    se = math.sqrt(pooled * (1 / n1 + 1 / n2))
    return from_t(mean1 - mean2, se, df, confidence, "student")


def _independent(name: str) -> Callable[[pd.Series, pd.Series, float], Comparison]:
    from_stats = welch_from_stats if name == "welch" else student_from_stats

    def compare_values(a: pd.Series, b: pd.Series, confidence: float) -> Comparison:
        x, y = finite(a), finite(b)
        if x.size < 2 or y.size < 2:
            return NAN_COMPARISON
        return from_stats(
            float(x.mean()), float(x.var(ddof=1)), x.size,
            float(y.mean()), float(y.var(ddof=1)), y.size, confidence,
        )  # fmt: skip

    return compare_values


def paired_values(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """The two inits' values of the seeds both have a finite value for, in seed order.

    Pairing by seed is what makes the paired tests valid here: one seed fixes
    the training subset (and the split) for every init.
    """
    if not isinstance(a, pd.Series) or not isinstance(b, pd.Series):
        raise TypeError("paired tests need values as pandas Series indexed by seed")
    for name, series in (("first", a), ("second", b)):
        if series.index.has_duplicates:
            raise ValueError(f"paired test: {name} group has duplicate seeds {list(series.index)}")
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    joined = joined.sort_index()
    return joined["a"].to_numpy(dtype=float), joined["b"].to_numpy(dtype=float)


def _paired_or_welch(
    a: pd.Series, b: pd.Series, confidence: float
) -> tuple[np.ndarray, np.ndarray] | Comparison:
    """The seed-matched pairs, or Welch's comparison (with a note) when fewer than 2 pairs."""
    x, y = paired_values(a, b)
    if x.size >= 2:
        return x, y
    fallback = _independent("welch")(a, b, confidence)
    note = f"only {x.size} seed(s) shared: Welch's test instead of the paired one"
    return Comparison(**{**fallback.__dict__, "notes": (*fallback.notes, note)})


def _paired_t(a: pd.Series, b: pd.Series, confidence: float) -> Comparison:
    pairs = _paired_or_welch(a, b, confidence)
    if isinstance(pairs, Comparison):
        return pairs
    d = pairs[0] - pairs[1]
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    return from_t(float(d.mean()), se, d.size - 1, confidence, "paired", n_pairs=int(d.size))


def wilcoxon_min_p(n: int) -> float:
    """The smallest two-sided p-value an exact signed-rank test can give with n pairs: 2 / 2**n."""
    return min(1.0, 2.0 / 2.0**n)


def _wilcoxon(a: pd.Series, b: pd.Series, confidence: float) -> Comparison:
    """Signed-rank p-values; the estimate and interval are the paired t's (a stated choice)."""
    pairs = _paired_or_welch(a, b, confidence)
    if isinstance(pairs, Comparison):
        return pairs
    x, y = pairs
    t_part = _paired_t(a, b, confidence)
    if np.all(x == y):
        return Comparison(**{**t_part.__dict__, "test": "wilcoxon"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        two = float(sps.wilcoxon(x, y).pvalue)
        less = float(sps.wilcoxon(x, y, alternative="less").pvalue)
        greater = float(sps.wilcoxon(x, y, alternative="greater").pvalue)
    return Comparison(
        t_part.estimate, t_part.se, t_part.df, t_part.ci_low, t_part.ci_high,
        two, less, greater, "wilcoxon", int(x.size), t_part.notes,
    )  # fmt: skip


@dataclass(frozen=True)
class TestSpec:
    """One comparison test: the raw-value comparison, and what summary statistics allow."""

    on_values: Callable[[pd.Series, pd.Series, float], Comparison]
    equal_var: bool | None
    """``equal_var`` for a comparison from summary statistics; None: needs paired raw values."""
    label: str


TESTS: Registry[TestSpec] = Registry(
    "statistical test",
    {
        "welch": TestSpec(_independent("welch"), False, "Welch's unequal-variance t-test"),
        "student": TestSpec(_independent("student"), True, "Student's pooled-variance t-test"),
        "paired": TestSpec(_paired_t, None, "paired t-test over runs matched by seed"),
        "wilcoxon": TestSpec(
            _wilcoxon, None, "Wilcoxon signed-rank test over runs matched by seed"
        ),
    },
)
"""Test name -> how to compute it (``stats.test``)."""


def compare(a: pd.Series, b: pd.Series, test: str, confidence: float = 0.95) -> Comparison:
    """Compare raw values of A and B (NaNs dropped) with ``test``; paired ones match by index."""
    spec = TESTS[test]
    if spec.equal_var is not None:
        return spec.on_values(pd.Series(a, dtype=float), pd.Series(b, dtype=float), confidence)
    return spec.on_values(a, b, confidence)


def tost(comparison: Comparison, margin: float) -> float:
    """Two one-sided tests: p-value of "|difference| < margin" (small: equivalent).

    Equivalence is claimed only when this p-value is below alpha, i.e. when the
    (1 - 2 alpha) interval of the difference lies inside (-margin, margin).
    NaN where the comparison has no finite standard error or the margin is not
    positive. Built on the t distribution of the comparison (for a Wilcoxon
    comparison: of the paired t, the estimate it reports).
    """
    c = comparison
    if not (margin > 0 and math.isfinite(c.se) and math.isfinite(c.df)) or c.df < 1:
        return math.nan
    if c.se == 0:
        return 0.0 if abs(c.estimate) < margin else 1.0
    p_lower = float(sps.t.sf((c.estimate + margin) / c.se, c.df))
    p_upper = float(sps.t.cdf((c.estimate - margin) / c.se, c.df))
    return max(p_lower, p_upper)
