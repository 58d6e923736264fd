"""Per-cell statistics, comparisons with the best and the reference, and marks.

One row of ``summary.csv`` per (task, metric, fraction, init), columns as in
docs/architecture.md. What each number means, and why:

* **Units of replication.** A pre-trained init's fine-tune seeds are nested
  in its pre-training runs (``pretrain_seed`` in runs.csv). When an init of a
  cell has two or more pre-training runs, its statistics are computed on the
  *pre-training-run means* (the mean over that run's fine-tune seeds): a
  second pre-training run is what samples pre-training noise, and treating
  its fine-tune seeds as independent runs would shrink the interval by the
  number of seeds. Means of units are used rather than a random-intercept
  model because with two or three pre-training runs a variance component is
  estimated at the boundary so often that its interval is not trustworthy,
  while the t interval on unit means is exact for balanced designs. With one
  pre-training run (or none: scratch, imported inits) the units are the
  fine-tune seeds, and a single pre-training run is noted as "pre-training
  variance not measured". ``n`` counts runs, ``n_units`` the units,
  ``n_pretrain`` and ``n_seeds`` the two levels.
* **Paired by default.** One seed fixes the training subset for every init,
  so when both inits' units are seeds the default test is the paired t-test
  on seed-matched differences (``stats.test``; Welch, Student and Wilcoxon
  stay available). Comparisons on pre-training-run means cannot be paired and
  use Welch's test; the ``notes`` say so.
* **The best.** Bold goes to the best mean. Whether another init is shown not
  to be the best is a comparison with *every* other init, not with the
  estimated best (which would be biased by the selection): Hsu's multiple
  comparisons with the best, in the Bonferroni form, ``p_not_best = min(1,
  (k - 1) min_j p(i worse than j))`` with one-sided p-values, then corrected
  (``stats.correction``) over the inits of the family: several inits may be
  tied with the best, and each of them marked "worse" would be an error, so
  the correction across inits is what keeps a cell of equal inits from
  showing a "worse" more often than alpha. ``stats.correction_family``
  widens the family from a cell to a task or the whole table. ``p_best`` is
  the bootstrap probability (seeds resampled jointly, ``stats.best_bootstrap``
  resamples) that the init has the best mean. Marks: ``best``, ``worse``
  (adjusted ``p_not_best`` < alpha) or ``not_separated``: the data cannot
  tell it from the best, which is *not* a claim of equivalence.
* **Equivalence** is claimed only by a test of it: two one-sided tests (TOST)
  of the difference to the best against ``stats.equivalence_margin`` (metric
  units), written as ``equivalent within ±m`` where the adjusted p < alpha.
* **Differences with intervals**: ``diff_vs_best`` and ``diff_vs_ref`` (this
  init minus the other) with their CIs, so every table can show effect sizes.
* **Warnings where a test cannot work** go to the log and the ``notes``
  column: fewer than 3 units, a Wilcoxon whose smallest possible p-value
  exceeds alpha, zero variance, all runs identical, runs flagged degenerate by
  fine-tuning (``flags``), one pre-training run.

``summary_from_published`` applies the same comparisons to published tables
(mean, std, n per cell), which allow only the independent tests, and flags
marks that flip within the rounding of the published digits.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from medssl.analysis.comparisons import (
    TESTS,
    Comparison,
    TestSpec,
    compare,
    finite,
    paired_values,
    student_from_stats,
    tost,
    welch_from_stats,
    wilcoxon_min_p,
)
from medssl.core.directions import METRIC_DIRECTION
from medssl.core.registry import Registry, UnknownNameError, look_up, unknown_name_message

log = logging.getLogger(__name__)

__all__ = [
    "TESTS",
    "TestSpec",
    "paired_values",
    "summarise",
    "summary_from_published",
    "compare_to_best",
]

SUMMARY_COLUMNS: tuple[str, ...] = (
    "task",
    "metric",
    "fraction",
    "init",
    "n",
    "n_units",
    "unit",
    "n_pretrain",
    "n_seeds",
    "mean",
    "std",
    "sem",
    "ci_low",
    "ci_high",
    "median",
    "best_init",
    "diff_vs_best",
    "diff_vs_best_ci_low",
    "diff_vs_best_ci_high",
    "p_not_best",
    "p_not_best_adj",
    "p_best",
    "mark",
    "p_equiv",
    "p_equiv_adj",
    "equivalence",
    "reference",
    "diff_vs_ref",
    "diff_vs_ref_ci_low",
    "diff_vs_ref_ci_high",
    "p_vs_ref",
    "p_vs_ref_adj",
    "stars",
    "family",
    "notes",
)
CELL_KEYS: tuple[str, ...] = ("task", "metric", "fraction")

DEFAULT_SETTINGS: dict[str, Any] = {
    "confidence": 0.95,
    "alpha": 0.05,
    "test": "paired",
    "correction": "holm",
    "correction_family": "cell",
    "reference": None,
    "equivalence_margin": None,
    "bootstrap": 0,
    "bootstrap_seed": 0,
    "best_bootstrap": 2000,
    "test_bootstrap": 0,
    "delong": False,
    "efficiency_model": "ols",
    "efficiency_scale": "logit",
    "logit_eps": 0.001,
    "efficiency_bootstrap": 1000,
}

STARS: tuple[tuple[float, str], ...] = ((0.001, "***"), (0.01, "**"), (0.05, "*"))
"""Conventional thresholds on the adjusted p-value; above the last: ``n.s.``."""

CORRECTIONS: Registry[str | None] = Registry(
    "correction", {"holm": "holm", "fdr_bh": "fdr_bh", "none": None}
)
"""Correction name -> statsmodels ``multipletests`` method (None: no correction)."""

FAMILIES: Registry[tuple[str, ...]] = Registry(
    "correction family", {"cell": CELL_KEYS, "task": ("task",), "table": ()}
)
"""``stats.correction_family`` -> the columns whose values define one family of tests."""

DIRECTIONS: tuple[str, ...] = ("higher", "lower")
"""Which way a metric is better (``stats.directions`` values)."""

MARKS: tuple[str, ...] = ("best", "not_separated", "worse")

MIN_UNITS = 3
"""Below this many units a t interval is so wide (t = 12.7 at n = 2) that the log says so."""

ONE_PRETRAIN_NOTE = "pre-training variance not measured (1 pre-training run)"


def stars(p_adj: float) -> str:
    """Significance stars of an adjusted p-value; empty where no test was made."""
    if not math.isfinite(p_adj):
        return ""
    for threshold, mark in STARS:
        if p_adj < threshold:
            return mark
    return "n.s."


def _check_fraction(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"stats.{key} must be a number in (0, 1), got {value!r}")


def _check_count(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"stats.{key} must be a non-negative integer, got {value!r}")


def resolve_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The stats settings with defaults filled in, validated so a typo fails loudly.

    ``efficiency_model`` and ``efficiency_scale`` are checked where they are
    used, by :func:`medssl.analysis.efficiency.efficiency_settings`.
    """
    merged = {**DEFAULT_SETTINGS, **(settings or {})}
    look_up("stats.test", merged["test"], TESTS)
    look_up("stats.correction", merged["correction"], CORRECTIONS)
    look_up("stats.correction_family", merged["correction_family"], FAMILIES)
    reference = merged["reference"]
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise ValueError(f"stats.reference must be an init name or null, got {reference!r}")
    margin = merged["equivalence_margin"]
    if margin is not None and (
        isinstance(margin, bool) or not isinstance(margin, int | float) or not margin > 0
    ):
        raise ValueError(
            f"stats.equivalence_margin must be a positive number or null, got {margin!r}"
        )
    for key in (
        "bootstrap",
        "bootstrap_seed",
        "best_bootstrap",
        "efficiency_bootstrap",
        "test_bootstrap",
    ):
        _check_count(key, merged[key])
    for key in ("confidence", "alpha", "logit_eps"):
        _check_fraction(key, merged[key])
    if merged["logit_eps"] >= 0.5:
        raise ValueError(f"stats.logit_eps must be below 0.5, got {merged['logit_eps']!r}")
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
    arr = finite(values)
    n = int(arr.size)
    out = dict.fromkeys(("mean", "std", "sem", "ci_low", "ci_high", "median"), math.nan)
    out = {"n": n, **out}
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


def two_sample_p(
    a: Sequence[float] | pd.Series, b: Sequence[float] | pd.Series, test: str = "paired"
) -> float:
    """Two-sided p-value of the chosen test on raw values (NaNs dropped), NaN where undefined.

    The t-tests agree with ``scipy.stats.ttest_ind`` / ``ttest_rel`` to
    rounding, but give NaN instead of scipy's ±inf statistic when the groups
    (or the paired differences) are constant: a zero-variance comparison says
    nothing about seeds. Paired tests need Series indexed by seed.
    """
    if TESTS[test].equal_var is None and not (
        isinstance(a, pd.Series) and isinstance(b, pd.Series)
    ):
        raise TypeError("paired tests need values as pandas Series indexed by seed")
    return compare(a, b, test).p_two_sided  # type: ignore[arg-type]


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
    elif method == "holm":
        out[mask] = holm(p[mask])
    else:
        out[mask] = multipletests(p[mask], method=method)[1]
    return out


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (equal to statsmodels' ``multipletests(method="holm")``).

    Written out because statsmodels' Holm branch calls ``gc.collect()`` on every
    call, which costs a tenth of a second in a process with a large heap, and
    the stats stage corrects one family per cell (thousands in study B's grid).
    """
    p = np.asarray(p, dtype=float)
    order = np.argsort(p, kind="mergesort")
    stepped = np.maximum.accumulate(p[order] * np.arange(p.size, 0, -1))
    out = np.empty_like(p)
    out[order] = np.minimum(stepped, 1.0)
    return out


@dataclass
class Group:
    """One (cell, init): its units of replication and what the log must hear about them."""

    units: pd.Series
    """One value per unit: per seed (index = seed) or per pre-training run (index = its seed)."""
    unit: str
    """``seed`` or ``pretrain_run``."""
    n_runs: int
    n_pretrain: int
    n_seeds: int
    notes: list[str] = field(default_factory=list)


def _sign(direction: str) -> float:
    return 1.0 if direction == "higher" else -1.0


def _best_index(frame: pd.DataFrame, direction: str) -> Any:
    """Row label of the best finite mean (None if none); ties go to the init name sorting first."""
    finite_rows = frame[np.isfinite(frame["mean"].to_numpy(dtype=float))]
    if finite_rows.empty:
        return None
    ascending = direction == "lower"
    ordered = finite_rows.sort_values(
        ["mean", "init"], ascending=[ascending, True], kind="mergesort"
    )
    return ordered.index[0]


def _from_stats(row: Mapping[str, Any], other: Mapping[str, Any], cfg: Mapping) -> Comparison:
    """Comparison of two summary rows (mean, std, n_units): what a published table allows."""
    from_stats = welch_from_stats if cfg["test"] != "student" else student_from_stats
    values = []
    for r in (row, other):
        std = float(r["std"])
        values += [float(r["mean"]), std * std, int(r.get("n_units", r["n"]))]
    if not all(math.isfinite(v) for v in values):
        return from_stats(math.nan, math.nan, 0, math.nan, math.nan, 0, cfg["confidence"])
    return from_stats(*values, cfg["confidence"])


def _compare_groups(a: Group, b: Group, cfg: Mapping[str, Any]) -> Comparison:
    """Compare two inits' units; seed units pair, pre-training-run means go to Welch."""
    test = cfg["test"]
    if TESTS[test].equal_var is None and (a.unit != "seed" or b.unit != "seed"):
        result = compare(a.units, b.units, "welch", cfg["confidence"])
        note = "Welch's test on pre-training-run means (not pairable by seed)"
        return Comparison(**{**result.__dict__, "notes": (*result.notes, note)})
    return compare(a.units, b.units, test, cfg["confidence"])


def _comparison_notes(c: Comparison, cfg: Mapping[str, Any]) -> list[str]:
    notes = list(c.notes)
    if c.test == "wilcoxon" and c.n_pairs and wilcoxon_min_p(c.n_pairs) > cfg["alpha"]:
        notes.append(
            f"Wilcoxon with {c.n_pairs} pairs cannot reach p < {cfg['alpha']:g} "
            f"(smallest possible p = {wilcoxon_min_p(c.n_pairs):.3g})"
        )
    return notes


def _p_best(groups: Sequence[Group], sign: float, cfg: Mapping[str, Any]) -> list[float]:
    """Bootstrap probability that each init has the best mean.

    Seeds are resampled jointly over the inits (the pairing by seed is kept)
    when every init's units are seeds and they share at least two seeds;
    otherwise each init's units are resampled on their own.
    """
    n_boot = cfg["best_bootstrap"]
    if n_boot == 0 or any(finite(g.units).size < 2 for g in groups):
        return [math.nan] * len(groups)
    rng = np.random.default_rng(cfg["bootstrap_seed"])
    seeds_only = all(g.unit == "seed" for g in groups)
    joined = (
        pd.concat([g.units for g in groups], axis=1, join="inner").dropna().sort_index()
        if seeds_only
        else None
    )
    if joined is not None and len(joined) >= 2:
        matrix = joined.to_numpy(dtype=float)
        idx = rng.integers(0, len(matrix), size=(n_boot, len(matrix)))
        means = matrix[idx].mean(axis=1)
    else:
        columns = []
        for g in groups:
            x = finite(g.units)
            columns.append(x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1))
        means = np.column_stack(columns)
    winners = np.argmax(sign * means, axis=1)
    return [float(np.mean(winners == k)) for k in range(len(groups))]


def _pairwise(
    frame: pd.DataFrame, cfg: Mapping[str, Any], groups: Mapping[Any, Group] | None
) -> dict[tuple[Any, Any], Comparison]:
    """Every ordered pair of the cell's rows compared (difference = first - second)."""
    out = {}
    records = frame.to_dict("index")
    for i in frame.index:
        for j in frame.index:
            if i == j:
                continue
            if groups is not None:
                out[i, j] = _compare_groups(groups[i], groups[j], cfg)
            else:
                out[i, j] = _from_stats(records[i], records[j], cfg)
    return out


def _p_worse(c: Comparison, direction: str) -> float:
    """One-sided p of "the first init is worse than the second" for this metric direction."""
    return c.p_less if direction == "higher" else c.p_greater


def _p_not_best(index: Any, frame: pd.DataFrame, pairs: Mapping, direction: str) -> float:
    """Hsu's MCB in its Bonferroni form: min over the others of the one-sided p, times k - 1."""
    p = [_p_worse(pairs[index, j], direction) for j in frame.index if j != index]
    p = [v for v in p if math.isfinite(v)]
    if not p:
        return math.nan
    return min(1.0, (len(frame) - 1) * min(p))


def _fill_cell(
    out: dict[str, dict[Any, Any]],
    frame: pd.DataFrame,
    cfg: Mapping[str, Any],
    groups: Mapping[Any, Group] | None,
    notes: dict[Any, list[str]],
) -> None:
    """Best, differences, MCB, TOST and reference values of one cell (raw p-values).

    ``out`` maps column -> row label -> value; columns are assigned once at the
    end, since assigning cell by cell in pandas costs more than the tests.
    """
    metric = str(frame["metric"].iloc[0])
    direction = metric_direction(metric, cfg.get("directions"))
    best = _best_index(frame, direction)
    pairs = _pairwise(frame, cfg, groups)
    reference = cfg["reference"]
    ref_rows = frame.index[frame["init"].astype(str) == reference] if reference else []
    ref = ref_rows[0] if len(ref_rows) else None
    if groups is not None and best is not None:
        p_best = _p_best([groups[i] for i in frame.index], _sign(direction), cfg)
        out["p_best"].update(zip(frame.index, p_best, strict=True))
    margin = cfg["equivalence_margin"]
    for i in frame.index:
        if best is not None:
            out["best_init"][i] = frame.loc[best, "init"]
            out["p_not_best"][i] = _p_not_best(i, frame, pairs, direction)
        if best is not None and i != best:
            c = pairs[i, best]
            _put_difference(out, "diff_vs_best", i, c)
            if margin is not None:
                out["p_equiv"][i] = tost(c, float(margin))
            notes[i] += _comparison_notes(c, cfg)
        if ref is not None:
            out["reference"][i] = reference
        if ref is not None and i != ref:
            c = pairs[i, ref]
            _put_difference(out, "diff_vs_ref", i, c)
            out["p_vs_ref"][i] = c.p_two_sided
            notes[i] += _comparison_notes(c, cfg)


def _put_difference(out: dict[str, dict[Any, Any]], prefix: str, i: Any, c: Comparison) -> None:
    out[prefix][i] = c.estimate
    out[f"{prefix}_ci_low"][i] = c.ci_low
    out[f"{prefix}_ci_high"][i] = c.ci_high


def family_label(cfg: Mapping[str, Any]) -> str:
    """The ``family`` column: which tests one correction covers."""
    return {"cell": "cell", "task": "task", "table": "table"}[cfg["correction_family"]]


def _correct(out: pd.DataFrame, cfg: Mapping[str, Any], cell_keys: Sequence[str]) -> None:
    """Adjusted p-values within each family, marks, equivalence texts and stars (in place)."""
    family = cfg["correction_family"]
    keys = list(cell_keys) if family == "cell" else [k for k in FAMILIES[family] if k in cell_keys]
    groups = out.groupby(keys, sort=False, dropna=False).indices if keys else {(): range(len(out))}
    columns = {c: out[c].to_numpy(dtype=float) for c in ("p_not_best", "p_equiv", "p_vs_ref")}
    adjusted = {c: np.full(len(out), math.nan) for c in columns}
    for positions in groups.values():
        positions = np.asarray(positions)
        for column, raw in columns.items():
            adjusted[column][positions] = adjust(raw[positions], cfg["correction"])
    for column, values in adjusted.items():
        out[f"{column}_adj"] = values
    alpha = cfg["alpha"]
    marks = []
    for row in out.itertuples():
        if (
            row.best_init is not pd.NA
            and isinstance(row.best_init, str)
            and row.init == row.best_init
        ):
            marks.append("best")
        elif math.isfinite(row.p_not_best_adj) and row.p_not_best_adj < alpha:
            marks.append("worse")
        else:
            marks.append("not_separated")
    out["mark"] = marks
    margin = cfg["equivalence_margin"]
    out["equivalence"] = [
        f"equivalent within ±{margin:g}" if math.isfinite(p) and p < alpha else ""
        for p in out["p_equiv_adj"].to_numpy(dtype=float)
    ]
    has_ref = out["reference"].notna().to_numpy()
    out["stars"] = [
        stars(p) if has else "" for p, has in zip(out["p_vs_ref_adj"], has_ref, strict=True)
    ]
    out["family"] = family_label(cfg)


def compare_to_best(
    summary: pd.DataFrame,
    settings: Mapping[str, Any] | None = None,
    groups: Mapping[tuple, Group] | None = None,
    cell_keys: Sequence[str] = CELL_KEYS,
    notes: Mapping[tuple, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Add the best, MCB, equivalence and reference columns, corrected within the family.

    ``summary`` needs the cell keys plus ``init, n, mean, std``. With ``groups``
    (``(*cell, init) -> Group``) the comparisons run on the units; without, from
    the summary statistics (Welch or Student), which is what a published table
    allows. ``notes`` (same keys) are carried into the ``notes`` column.
    """
    cfg = resolve_settings(settings)
    out = summary.copy()
    float_columns = SUMMARY_COLUMNS[16:22] + SUMMARY_COLUMNS[23:25] + SUMMARY_COLUMNS[27:32]
    values: dict[str, dict[Any, Any]] = {c: {} for c in ("best_init", "reference", *float_columns)}
    keys = list(cell_keys)
    records = out[[*keys, "init"]].to_dict("index")
    row_key = {i: (*(r[k] for k in keys), r["init"]) for i, r in records.items()}
    row_notes = {i: list((notes or {}).get(row_key[i], ())) for i in out.index}
    for _, frame in out.groupby(keys, sort=True, dropna=False):
        by_row = {i: groups[row_key[i]] for i in frame.index} if groups is not None else None
        _fill_cell(values, frame, cfg, by_row, row_notes)
    for column in ("best_init", "reference"):
        out[column] = pd.Series(values[column], dtype="object").reindex(out.index)
    for column in float_columns:
        out[column] = pd.Series(values[column], dtype=float).reindex(out.index)
    _correct(out, cfg, keys)
    out["notes"] = ["; ".join(dict.fromkeys(row_notes[i])) for i in out.index]
    return out


def _group(frame: pd.DataFrame, has_pretrain: bool) -> Group:
    """The units of one (cell, init) and the notes its runs call for."""
    frame = frame[np.isfinite(frame["value"].to_numpy(dtype=float))]
    n_pretrain = int(frame["pretrain_seed"].dropna().nunique()) if has_pretrain else 0
    n_seeds = int(frame["seed"].nunique()) if "seed" in frame.columns else len(frame)
    if n_pretrain >= 2:
        units = frame.dropna(subset=["pretrain_seed"]).groupby("pretrain_seed")["value"].mean()
        unit = "pretrain_run"
    else:
        index = frame["seed"].to_numpy() if "seed" in frame.columns else None
        units = pd.Series(frame["value"].to_numpy(dtype=float), index=index)
        unit = "seed"
    units = units.astype(float).sort_index(kind="mergesort")
    group = Group(units, unit, len(frame), n_pretrain, n_seeds)
    if n_pretrain == 1:
        group.notes.append(ONE_PRETRAIN_NOTE)
    if len(units) == 1:
        group.notes.append(f"only 1 unit ({unit}): no interval, no test")
    elif 1 < len(units) < MIN_UNITS:
        t = float(sps.t.ppf(0.975, len(units) - 1))
        group.notes.append(
            f"only {len(units)} unit(s) ({unit}): intervals and tests are weak "
            f"(two-sided 95% critical t = {t:.3g})"
        )
    if len(frame) >= 2 and np.ptp(frame["value"].to_numpy(dtype=float)) == 0:
        group.notes.append("all runs identical")
    if "flags" in frame.columns:
        flags = frame["flags"].fillna("").astype(str)
        counts = pd.Series([f for text in flags for f in text.split(";") if f]).value_counts()
        for name, count in sorted(counts.items()):
            group.notes.append(f"{count} of {len(frame)} runs flagged {name}")
    return group


def summarise(runs: pd.DataFrame, settings: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """summary.csv from the tidy runs table: statistics, comparisons and marks per cell."""
    cfg = resolve_settings(settings)
    required = {"task", "metric", "fraction", "init", "value", "seed"}
    missing = required - set(runs.columns)
    if missing:
        raise ValueError(f"runs table lacks columns {sorted(missing)}")
    has_pretrain = "pretrain_seed" in runs.columns
    if not has_pretrain:
        log.warning(
            "runs table has no pretrain_seed column (older runs): each init is taken as one "
            "pre-training run and the units are its fine-tune seeds"
        )
    keys = [*CELL_KEYS, "init"]
    rows, groups, notes = [], {}, {}
    for key, frame in runs.groupby(keys, sort=True):
        group = _group(frame, has_pretrain)
        groups[key], notes[key] = group, group.notes
        stats = describe(group.units, cfg["confidence"], cfg["bootstrap"], cfg["bootstrap_seed"])
        stats.update(n=group.n_runs, n_units=int(finite(group.units).size), unit=group.unit)
        stats.update(n_pretrain=group.n_pretrain, n_seeds=group.n_seeds)
        rows.append({**dict(zip(keys, key, strict=True)), **stats})
    summary = pd.DataFrame(rows, columns=[*keys, *SUMMARY_COLUMNS[4:15]])
    summary = compare_to_best(summary, cfg, groups=groups, notes=notes)
    for column in ("n", "n_units", "n_pretrain", "n_seeds"):
        summary[column] = summary[column].astype("int64")
    for row in summary[summary["notes"] != ""].itertuples():
        log.warning("%s/%s/%g/%s: %s", row.task, row.metric, row.fraction, row.init, row.notes)
    return (
        summary[list(SUMMARY_COLUMNS)]
        .sort_values([*CELL_KEYS, "init"], kind="mergesort")
        .reset_index(drop=True)
    )


PUBLISHED_COLUMNS: tuple[str, ...] = ("task", "metric", "init", "mean", "std", "n")


def published_decimals(text: Sequence[str]) -> int:
    """The most digits after the decimal point among published numbers written as text."""
    digits = [len(t.split(".", 1)[1]) if "." in t else 0 for t in map(str, text)]
    return max(digits, default=0)


def _sample_std(table: pd.DataFrame, std_ddof: int) -> pd.Series:
    """Published stds as sample stds: a population std (ddof 0) times sqrt(n / (n - 1))."""
    if std_ddof == 1:
        return table["std"].astype(float)
    n = table["n"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(n > 1, np.sqrt(n / (n - 1)), math.nan)
    return table["std"].astype(float) * factor


def _published_marks(
    table: pd.DataFrame, cfg: Mapping[str, Any], std_ddof: int, keys: Sequence[str]
) -> pd.DataFrame:
    out = table.copy()
    out["std"] = _sample_std(out, std_ddof)
    out["n_units"] = out["n"]
    return compare_to_best(out, cfg, cell_keys=keys)


def _rounding_extremes(
    table: pd.DataFrame, cfg: Mapping[str, Any], std_ddof: int, keys: Sequence[str], half: float
) -> tuple[list[str], list[str]]:
    """Each row's mark with the published numbers moved to the ends of their rounding interval.

    "Favoured": this init's mean moved half a unit of the last digit towards
    better, every other init's of the cell towards worse, and every std of the
    cell up (less significance against it); "disfavoured" the opposite.
    """
    favoured, disfavoured = [], []
    for i in table.index:
        in_cell = np.ones(len(table), dtype=bool)
        for k in keys:
            in_cell &= (table[k] == table.loc[i, k]).to_numpy()
        cell = table[in_cell]
        sign = _sign(metric_direction(str(table.loc[i, "metric"]), cfg.get("directions")))
        marks = []
        for towards in (1.0, -1.0):
            moved = cell.copy()
            shift = np.where(moved.index == i, towards * sign * half, -towards * sign * half)
            moved["mean"] = moved["mean"] + shift
            moved["std"] = (moved["std"] + towards * half).clip(lower=0.0)
            marks.append(_published_marks(moved, cfg, std_ddof, keys).loc[i, "mark"])
        favoured.append(marks[0])
        disfavoured.append(marks[1])
    return favoured, disfavoured


def summary_from_published(
    table: pd.DataFrame,
    settings: Mapping[str, Any] | None = None,
    std_ddof: int = 1,
    decimals: int | None = None,
) -> pd.DataFrame:
    """Marks for a published table of ``task, metric, init, mean, std, n``.

    A ``fraction`` column, if present, splits cells like ours. ``std_ddof`` is
    the ddof the authors used: 0 (NumPy's default ``np.std``, the population
    std) is converted to the sample std with ``sqrt(n / (n - 1))``; the output
    ``std`` is the sample std. A table allows only independent tests: a paired
    ``stats.test`` falls back to Welch's, with a note. With ``decimals`` (the
    published digits), ``mark_if_favoured`` / ``mark_if_disfavoured`` hold the
    marks at the ends of the rounding interval and ``flips_within_rounding``
    says whether they differ.
    """
    if std_ddof not in (0, 1):
        raise ValueError(f"std_ddof must be 0 or 1, got {std_ddof!r}")
    missing = set(PUBLISHED_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"published table lacks columns {sorted(missing)}")
    cfg = resolve_settings(settings)
    note = ""
    if TESTS[cfg["test"]].equal_var is None:
        note = f"stats.test {cfg['test']!r} needs paired runs; Welch's test from mean, std, n"
        log.warning("published table: %s", note)
        cfg = {**cfg, "test": "welch"}
    table = table.copy().reset_index(drop=True)
    table["n"] = table["n"].astype("int64")
    table["mean"] = table["mean"].astype(float)
    table["std"] = table["std"].astype(float)
    keys = [k for k in CELL_KEYS if k in table.columns]
    out = _published_marks(table, cfg, std_ddof, keys)
    if note:
        out["notes"] = [f"{note}; {n}" if n else note for n in out["notes"]]
    extra: list[str] = []
    if decimals is not None:
        half = 0.5 * 10.0 ** (-decimals)
        favoured, disfavoured = _rounding_extremes(table, cfg, std_ddof, keys, half)
        out["mark_if_favoured"] = favoured
        out["mark_if_disfavoured"] = disfavoured
        out["flips_within_rounding"] = [a != b for a, b in zip(favoured, disfavoured, strict=True)]
        extra = ["mark_if_favoured", "mark_if_disfavoured", "flips_within_rounding"]
    columns = [
        *keys,
        *("init", "n", "mean", "std", "best_init", "diff_vs_best", "diff_vs_best_ci_low"),
        *("diff_vs_best_ci_high", "p_not_best", "p_not_best_adj", "mark", *extra),
        *("p_equiv", "p_equiv_adj", "equivalence", "reference", "diff_vs_ref"),
        *("diff_vs_ref_ci_low", "diff_vs_ref_ci_high", "p_vs_ref", "p_vs_ref_adj", "stars"),
        *("family", "notes"),
    ]
    return out[columns].sort_values([*keys, "init"], kind="mergesort").reset_index(drop=True)
