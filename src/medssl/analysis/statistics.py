"""Per-cell statistics and significance marks from the tidy runs table.

One row of ``summary.csv`` per (task, metric, fraction, init), columns exactly as
in docs/architecture.md. Inside each (task, metric, fraction) cell the init with
the best mean is compared with every other init by a two-sample t-test (Welch
by default, as study B's "mean ± std over 10 runs, bold = best, shaded = not
significantly different" tables), the p-values are corrected for the multiple
comparisons inside the cell (Holm by default), and each init gets a mark:
``best``, ``equivalent`` (adjusted p > alpha, or no test possible) or ``worse``.

Conventions worth knowing downstream:

* ``n`` counts the finite values of a cell; a run whose metric is NaN (an
  undefined AUC) is left out of every statistic rather than poisoning the mean.
* ``std`` is the sample std (ddof=1); ``sem = std / sqrt(n)``; the CI is
  t-based, ``mean ± t_{(1+confidence)/2, n-1} * sem``; all three are NaN for n < 2.
* The p-value is NaN for the best itself, when either group has n < 2, and when
  both groups have zero variance (the t statistic is undefined). NaN counts as
  "not shown to differ", so such an init is marked ``equivalent``: with so few
  runs a claim of difference is not supported by the data.
* "Best" follows a per-metric direction (``METRIC_DIRECTION``): highest mean
  for AUC/accuracy/F1/Dice, lowest for losses. Ties go to the init whose name
  sorts first, so the choice is deterministic.

Against a reference init (``stats.reference``, e.g. ``scratch``) every other
init of the cell is tested too (``p_vs_ref``, corrected within the cell into
``p_vs_ref_adj``) and gets conventional significance stars (``stars``: n.s.,
*, **, *** at adjusted p < 0.05, 0.01, 0.001). The test is a registry entry
(``TESTS``): Welch or Student two-sample t-tests, or, because the training
subsets of one seed are shared by every init, a paired t-test or a Wilcoxon
signed-rank test over the runs matched by seed. ``stats.bootstrap = N > 0``
replaces the t-based CI by a percentile bootstrap CI with N resamples, seeded
by ``stats.bootstrap_seed`` per cell so a cell's CI does not depend on which
other cells exist.

``summary_from_published`` applies the same test and marks to published
tables (mean, std, n per cell), so a paper's claims can be checked against our
own runs with one implementation.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from medssl.core.directions import METRIC_DIRECTION
from medssl.core.registry import Registry, UnknownNameError, look_up, unknown_name_message

log = logging.getLogger(__name__)

SUMMARY_COLUMNS: tuple[str, ...] = (
    "task",
    "metric",
    "fraction",
    "init",
    "n",
    "mean",
    "std",
    "sem",
    "ci_low",
    "ci_high",
    "median",
    "best_init",
    "p_vs_best",
    "p_vs_best_adj",
    "mark",
    "reference",
    "p_vs_ref",
    "p_vs_ref_adj",
    "stars",
)
CELL_KEYS: tuple[str, ...] = ("task", "metric", "fraction")

DEFAULT_SETTINGS: dict[str, Any] = {
    "confidence": 0.95,
    "alpha": 0.05,
    "test": "welch",
    "correction": "holm",
    "reference": None,
    "bootstrap": 0,
    "bootstrap_seed": 0,
    "efficiency_model": "ols",
}


def _finite(values: Sequence[float] | np.ndarray | pd.Series) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]


def _independent(equal_var: bool) -> Callable[[pd.Series, pd.Series], float]:
    def test(a: pd.Series, b: pd.Series) -> float:
        x, y = _finite(a), _finite(b)
        if x.size < 2 or y.size < 2:
            return math.nan
        if np.ptp(x) == 0 and np.ptp(y) == 0:
            return math.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(sps.ttest_ind(x, y, equal_var=equal_var).pvalue)

    return test


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


def _paired_t(a: pd.Series, b: pd.Series) -> float:
    x, y = paired_values(a, b)
    if x.size < 2 or np.ptp(x - y) == 0:
        return math.nan
    return float(sps.ttest_rel(x, y).pvalue)


def _wilcoxon(a: pd.Series, b: pd.Series) -> float:
    x, y = paired_values(a, b)
    if x.size < 1 or np.all(x == y):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(sps.wilcoxon(x, y).pvalue)


@dataclass(frozen=True)
class TestSpec:
    """One comparison test: the raw-value function, and what summary statistics allow."""

    on_values: Callable[[pd.Series, pd.Series], float]
    equal_var: bool | None
    """``equal_var`` of ``ttest_ind_from_stats``; None: needs paired raw values."""
    label: str


TESTS: Registry[TestSpec] = Registry(
    "statistical test",
    {
        "welch": TestSpec(_independent(False), False, "Welch's unequal-variance t-test"),
        "student": TestSpec(_independent(True), True, "Student's pooled-variance t-test"),
        "paired": TestSpec(_paired_t, None, "paired t-test over runs matched by seed"),
        "wilcoxon": TestSpec(
            _wilcoxon, None, "Wilcoxon signed-rank test over runs matched by seed"
        ),
    },
)
"""Test name -> how to compute it (``stats.test``)."""

STARS: tuple[tuple[float, str], ...] = ((0.001, "***"), (0.01, "**"), (0.05, "*"))
"""Conventional thresholds on the adjusted p-value; above the last: ``n.s.``."""


def stars(p_adj: float) -> str:
    """Significance stars of an adjusted p-value; empty where no test was made."""
    if not math.isfinite(p_adj):
        return ""
    for threshold, mark in STARS:
        if p_adj < threshold:
            return mark
    return "n.s."


CORRECTIONS: Registry[str | None] = Registry(
    "correction", {"holm": "holm", "fdr_bh": "fdr_bh", "none": None}
)
"""Correction name -> statsmodels ``multipletests`` method (None: no correction)."""

DIRECTIONS: tuple[str, ...] = ("higher", "lower")
"""Which way a metric is better (``stats.directions`` values)."""


MARKS: tuple[str, ...] = ("best", "equivalent", "worse")


def resolve_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The stats settings with defaults filled in, validated so a typo fails loudly.

    ``efficiency_model`` is checked where it is used, by
    :func:`medssl.analysis.efficiency.label_efficiency`, which holds the models.
    """
    merged = {**DEFAULT_SETTINGS, **(settings or {})}
    look_up("stats.test", merged["test"], TESTS)
    look_up("stats.correction", merged["correction"], CORRECTIONS)
    reference = merged["reference"]
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise ValueError(f"stats.reference must be an init name or null, got {reference!r}")
    for key in ("bootstrap", "bootstrap_seed"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"stats.{key} must be a non-negative integer, got {value!r}")
    for key in ("confidence", "alpha"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise ValueError(f"stats.{key} must be a number in (0, 1), got {value!r}")
    directions = merged.get("directions") or {}
    if not isinstance(directions, Mapping):
        raise ValueError(f"stats.directions must map metric -> 'higher'|'lower', got {directions}")
    for direction in directions.values():
        look_up("stats.directions value", direction, DIRECTIONS)
    return merged


def metric_direction(metric: str, overrides: Mapping[str, str] | None = None) -> str:
    """``"higher"`` or ``"lower"``: which way is better for ``metric``.

    Published tables name metrics loosely ("mean AUC (%)", "Dice (%)"), so the
    name is lower-cased, parenthesised units are dropped and each word is tried
    against the table; an exact match always wins.
    """
    table = {**METRIC_DIRECTION, **(overrides or {})}
    if metric in table:
        return table[metric]
    name = re.sub(r"\([^)]*\)", " ", metric.lower()).strip()
    candidates = [name, name.replace(" ", "_"), *re.split(r"[\s_\-/]+", name)]
    found = {table[c] for c in candidates if c in table}
    if len(found) == 1:
        return found.pop()
    raise UnknownNameError(
        f"{unknown_name_message('metric', metric, table)}; "
        f"for another metric, add it to stats.directions (metric -> 'higher' or 'lower')"
    )


def describe(
    values: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
) -> dict[str, float]:
    """n, mean, sample std, sem, CI and median of the finite values given.

    The CI is t-based, or with ``bootstrap = N > 0`` the percentile bootstrap
    CI of the mean from ``scipy.stats.bootstrap`` with N resamples.
    """
    arr = _finite(values)
    n = int(arr.size)
    out = {
        "n": n,
        "mean": math.nan,
        "std": math.nan,
        "sem": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "median": math.nan,
    }
    if n == 0:
        return out
    out["mean"] = float(np.mean(arr))
    out["median"] = float(np.median(arr))
    if n >= 2:
        std = float(np.std(arr, ddof=1))
        sem = std / math.sqrt(n)
        half = float(sps.t.ppf((1 + confidence) / 2, n - 1)) * sem
        out.update(std=std, sem=sem, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
        if bootstrap > 0:
            res = sps.bootstrap(
                (arr,),
                np.mean,
                n_resamples=bootstrap,
                confidence_level=confidence,
                method="percentile",
                rng=np.random.default_rng(bootstrap_seed),
            )
            out.update(
                ci_low=float(res.confidence_interval.low),
                ci_high=float(res.confidence_interval.high),
            )
    return out


def _ttest_from_stats(
    mean1: float,
    std1: float,
    n1: int,
    mean2: float,
    std2: float,
    n2: int,
    equal_var: bool,
) -> float:
    """Two-sided p-value, NaN where the test is undefined (n < 2, both variances zero)."""
    if n1 < 2 or n2 < 2 or not all(map(math.isfinite, (mean1, std1, mean2, std2))):
        return math.nan
    if std1 == 0 and std2 == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sps.ttest_ind_from_stats(mean1, std1, n1, mean2, std2, n2, equal_var=equal_var)
    return float(res.pvalue)


def two_sample_p(
    a: Sequence[float] | pd.Series, b: Sequence[float] | pd.Series, test: str = "welch"
) -> float:
    """p-value of the chosen test on raw values (NaNs dropped), NaN where undefined.

    The t-tests call ``scipy.stats.ttest_ind`` / ``ttest_rel`` so results agree
    with them to the last bit, but return NaN instead of scipy's ±inf statistic
    when the groups (or the paired differences) are constant: a zero-variance
    comparison says nothing about seeds. Paired tests need Series indexed by seed.
    """
    spec = TESTS[test]
    if spec.equal_var is not None:
        return spec.on_values(pd.Series(a, dtype=float), pd.Series(b, dtype=float))
    return spec.on_values(a, b)  # type: ignore[arg-type]


def adjust(pvalues: Sequence[float], correction: str = "holm") -> np.ndarray:
    """Correct the finite p-values for multiple comparisons; NaNs stay NaN.

    NaNs are not comparisons that were made, so they do not count towards the
    family size.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    mask = np.isfinite(p)
    method = CORRECTIONS[correction]
    if not mask.any():
        return out
    if method is None:
        out[mask] = p[mask]
    else:
        out[mask] = multipletests(p[mask], method=method)[1]
    return out


def _best_index(frame: pd.DataFrame, direction: str) -> Any:
    """Row label of the best finite mean (None if none); ties go to the init name sorting first."""
    finite = frame[np.isfinite(frame["mean"].to_numpy(dtype=float))]
    if finite.empty:
        return None
    ascending = direction == "lower"
    ordered = finite.sort_values(["mean", "init"], ascending=[ascending, True], kind="mergesort")
    return ordered.index[0]


def _mark(frame: pd.DataFrame, best: Any, alpha: float) -> list[str]:
    marks = []
    for idx, p_adj in zip(frame.index, frame["p_vs_best_adj"], strict=True):
        if idx == best:
            marks.append("best")
        elif math.isnan(p_adj) or p_adj > alpha:
            marks.append("equivalent")
        else:
            marks.append("worse")
    return marks


def _p_value(
    cfg: Mapping[str, Any],
    row: Mapping[str, Any],
    other: Mapping[str, Any],
    values: Mapping[tuple, pd.Series] | None,
    cell: tuple,
) -> float:
    """p-value of ``row``'s init against ``other``'s inside one cell.

    From the raw values when given, else from the summary statistics, which
    only the independent t-tests allow.
    """
    spec = TESTS[cfg["test"]]
    if values is not None:
        return two_sample_p(
            values[(*cell, row["init"])], values[(*cell, other["init"])], cfg["test"]
        )
    if spec.equal_var is None:
        raise ValueError(
            f"stats.test={cfg['test']!r} pairs runs by seed and needs raw values; "
            f"a table of mean, std and n allows only 'welch' or 'student'"
        )
    return _ttest_from_stats(
        float(row["mean"]),
        float(row["std"]),
        int(row["n"]),
        float(other["mean"]),
        float(other["std"]),
        int(other["n"]),
        spec.equal_var,
    )


def compare_to_best(
    summary: pd.DataFrame,
    settings: Mapping[str, Any] | None = None,
    values: Mapping[tuple, pd.Series] | None = None,
    cell_keys: Sequence[str] = CELL_KEYS,
) -> pd.DataFrame:
    """Add ``best_init``, ``p_vs_best``, ``p_vs_best_adj``, ``mark`` and the reference columns.

    ``summary`` needs the cell keys plus ``init, n, mean, std``. With ``values``
    (``(*cell, init) -> raw values``, a Series indexed by seed for the paired
    tests) the test runs on the raw values; without, from the summary
    statistics via ``ttest_ind_from_stats``, which is what a published table
    allows. The reference columns (``reference, p_vs_ref, p_vs_ref_adj,
    stars``) are empty where ``stats.reference`` is null or absent from a cell.
    """
    cfg = resolve_settings(settings)
    out = summary.copy()
    out["best_init"] = pd.Series(pd.NA, index=out.index, dtype="object")
    out["p_vs_best"] = math.nan
    out["p_vs_best_adj"] = math.nan
    out["mark"] = ""
    out["reference"] = pd.Series(pd.NA, index=out.index, dtype="object")
    out["p_vs_ref"] = math.nan
    out["p_vs_ref_adj"] = math.nan
    out["stars"] = ""
    keys = list(cell_keys)
    for cell, frame in out.groupby(keys, sort=True, dropna=False):
        cell = cell if isinstance(cell, tuple) else (cell,)
        _compare_reference(out, frame, cfg, values, cell)
        metric = str(frame["metric"].iloc[0])
        best = _best_index(frame, metric_direction(metric, cfg.get("directions")))
        if best is None:
            out.loc[frame.index, "mark"] = "equivalent"
            continue
        best_row = out.loc[best]
        p = [
            math.nan if idx == best else _p_value(cfg, row, best_row, values, cell)
            for idx, row in frame.iterrows()
        ]
        out.loc[frame.index, "best_init"] = best_row["init"]
        out.loc[frame.index, "p_vs_best"] = p
        out.loc[frame.index, "p_vs_best_adj"] = adjust(p, cfg["correction"])
        out.loc[frame.index, "mark"] = _mark(out.loc[frame.index], best, cfg["alpha"])
    return out


def _compare_reference(
    out: pd.DataFrame,
    frame: pd.DataFrame,
    cfg: Mapping[str, Any],
    values: Mapping[tuple, pd.Series] | None,
    cell: tuple,
) -> None:
    """Fill the reference columns of one cell in place (nothing without a reference)."""
    reference = cfg["reference"]
    matches = frame.index[frame["init"].astype(str) == reference] if reference else []
    if len(matches) == 0:
        return
    ref_row = out.loc[matches[0]]
    p = [
        math.nan if idx == matches[0] else _p_value(cfg, row, ref_row, values, cell)
        for idx, row in frame.iterrows()
    ]
    adjusted = adjust(p, cfg["correction"])
    out.loc[frame.index, "reference"] = reference
    out.loc[frame.index, "p_vs_ref"] = p
    out.loc[frame.index, "p_vs_ref_adj"] = adjusted
    out.loc[frame.index, "stars"] = [stars(v) for v in adjusted]


def summarise(runs: pd.DataFrame, settings: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """summary.csv from the tidy runs table: statistics, tests and marks per cell."""
    cfg = resolve_settings(settings)
    required = {"task", "metric", "fraction", "init", "value"}
    if TESTS[cfg["test"]].equal_var is None:
        required.add("seed")
    missing = required - set(runs.columns)
    if missing:
        raise ValueError(f"runs table lacks columns {sorted(missing)}")
    keys = [*CELL_KEYS, "init"]
    rows = []
    values: dict[tuple, pd.Series] = {}
    for key, frame in runs.groupby(keys, sort=True):
        index = frame["seed"].to_numpy() if "seed" in frame.columns else None
        vals = pd.Series(frame["value"].to_numpy(dtype=float), index=index)
        values[key] = vals
        stats = describe(vals, cfg["confidence"], cfg["bootstrap"], cfg["bootstrap_seed"])
        rows.append({**dict(zip(keys, key, strict=True)), **stats})
    stat_columns = ["n", "mean", "std", "sem", "ci_low", "ci_high", "median"]
    summary = pd.DataFrame(rows, columns=[*keys, *stat_columns])
    summary = compare_to_best(summary, cfg, values=values)
    summary["n"] = summary["n"].astype("int64")
    return (
        summary[list(SUMMARY_COLUMNS)]
        .sort_values([*CELL_KEYS, "init"], kind="mergesort")
        .reset_index(drop=True)
    )


def summary_from_published(
    table: pd.DataFrame,
    settings: Mapping[str, Any] | None = None,
    std_ddof: int = 1,
) -> pd.DataFrame:
    """Marks for a published table of ``task, metric, init, mean, std, n``.

    A ``fraction`` column, if present, splits cells like ours. ``std_ddof`` is
    the ddof the authors used: 0 (NumPy's default ``np.std``, the population
    std) is converted to the sample std with ``sqrt(n / (n - 1))`` before the
    t-test, which assumes sample stds; the output ``std`` is the sample std.
    """
    if std_ddof not in (0, 1):
        raise ValueError(f"std_ddof must be 0 or 1, got {std_ddof!r}")
    missing = {"task", "metric", "init", "mean", "std", "n"} - set(table.columns)
    if missing:
        raise ValueError(f"published table lacks columns {sorted(missing)}")
    out = table.copy()
    out["n"] = out["n"].astype("int64")
    out["mean"] = out["mean"].astype(float)
    out["std"] = out["std"].astype(float)
    if std_ddof == 0:
        n = out["n"].to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.where(n > 1, np.sqrt(n / (n - 1)), math.nan)
        out["std"] = out["std"] * factor
    keys = [k for k in CELL_KEYS if k in out.columns]
    out = compare_to_best(out, settings, cell_keys=keys)
    columns = [
        *keys,
        *("init", "n", "mean", "std", "best_init", "p_vs_best", "p_vs_best_adj", "mark"),
        *("reference", "p_vs_ref", "p_vs_ref_adj", "stars"),
    ]
    return out[columns].sort_values([*keys, "init"], kind="mergesort").reset_index(drop=True)
