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

``summary_from_published`` applies the same test and marks to published
tables (mean, std, n per cell), so a paper's claims can be checked against our
own runs with one implementation.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from medssl.directions import METRIC_DIRECTION
from medssl.io import write_csv, write_json
from medssl.provenance import record

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
)
CELL_KEYS: tuple[str, ...] = ("task", "metric", "fraction")

DEFAULT_SETTINGS: dict[str, Any] = {
    "confidence": 0.95,
    "alpha": 0.05,
    "test": "welch",
    "correction": "holm",
}

TESTS: dict[str, bool] = {"welch": False, "student": True}
"""Test name -> ``equal_var`` argument of scipy's two-sample t-test."""

CORRECTIONS: dict[str, str | None] = {"holm": "holm", "fdr_bh": "fdr_bh", "none": None}
"""Correction name -> statsmodels ``multipletests`` method (None: no correction)."""


MARKS: tuple[str, ...] = ("best", "equivalent", "worse")


def resolve_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The stats settings with defaults filled in, validated so a typo fails loudly."""
    merged = {**DEFAULT_SETTINGS, **(settings or {})}
    if merged["test"] not in TESTS:
        raise ValueError(f"stats.test must be one of {sorted(TESTS)}, got {merged['test']!r}")
    if merged["correction"] not in CORRECTIONS:
        raise ValueError(
            f"stats.correction must be one of {sorted(CORRECTIONS)}, got {merged['correction']!r}"
        )
    for key in ("confidence", "alpha"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise ValueError(f"stats.{key} must be a number in (0, 1), got {value!r}")
    directions = merged.get("directions") or {}
    if not isinstance(directions, Mapping) or any(
        v not in ("higher", "lower") for v in directions.values()
    ):
        raise ValueError(f"stats.directions must map metric -> 'higher'|'lower', got {directions}")
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
    raise ValueError(
        f"unknown direction for metric {metric!r}: add it to stats.directions "
        f"(metric -> 'higher' or 'lower')"
    )


def describe(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """n, mean, sample std, sem, t-based CI and median of the finite values given."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
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


def two_sample_p(a: Sequence[float], b: Sequence[float], test: str = "welch") -> float:
    """p-value of the chosen two-sample t-test on raw values (NaNs dropped).

    Calls ``scipy.stats.ttest_ind`` so results agree with it to the last bit,
    but returns NaN instead of scipy's ±inf statistic / 0 p-value when both
    groups are constant: a zero-variance comparison says nothing about seeds.
    """
    equal_var = TESTS[test]
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    x = x[np.isfinite(x)]
    y = y[np.isfinite(y)]
    if x.size < 2 or y.size < 2:
        return math.nan
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sps.ttest_ind(x, y, equal_var=equal_var)
    return float(res.pvalue)


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


def compare_to_best(
    summary: pd.DataFrame,
    settings: Mapping[str, Any] | None = None,
    values: Mapping[tuple, np.ndarray] | None = None,
    cell_keys: Sequence[str] = CELL_KEYS,
) -> pd.DataFrame:
    """Add ``best_init``, ``p_vs_best``, ``p_vs_best_adj`` and ``mark`` per cell.

    ``summary`` needs the cell keys plus ``init, n, mean, std``. With ``values``
    (``(*cell, init) -> raw values``) the test runs on the raw values via
    ``scipy.stats.ttest_ind``; without, from the summary statistics via
    ``ttest_ind_from_stats``, which is what a published table allows.
    """
    cfg = resolve_settings(settings)
    equal_var = TESTS[cfg["test"]]
    out = summary.copy()
    out["best_init"] = pd.Series(pd.NA, index=out.index, dtype="object")
    out["p_vs_best"] = math.nan
    out["p_vs_best_adj"] = math.nan
    out["mark"] = ""
    keys = list(cell_keys)
    for cell, frame in out.groupby(keys, sort=True, dropna=False):
        cell = cell if isinstance(cell, tuple) else (cell,)
        metric = str(frame["metric"].iloc[0])
        best = _best_index(frame, metric_direction(metric, cfg.get("directions")))
        if best is None:
            out.loc[frame.index, "mark"] = "equivalent"
            continue
        best_row = out.loc[best]
        p = []
        for idx, row in frame.iterrows():
            if idx == best:
                p.append(math.nan)
            elif values is not None:
                p.append(
                    two_sample_p(
                        values[(*cell, row["init"])],
                        values[(*cell, best_row["init"])],
                        cfg["test"],
                    )
                )
            else:
                p.append(
                    _ttest_from_stats(
                        float(row["mean"]),
                        float(row["std"]),
                        int(row["n"]),
                        float(best_row["mean"]),
                        float(best_row["std"]),
                        int(best_row["n"]),
                        equal_var,
                    )
                )
        out.loc[frame.index, "best_init"] = best_row["init"]
        out.loc[frame.index, "p_vs_best"] = p
        out.loc[frame.index, "p_vs_best_adj"] = adjust(p, cfg["correction"])
        out.loc[frame.index, "mark"] = _mark(out.loc[frame.index], best, cfg["alpha"])
    return out


def summarise(runs: pd.DataFrame, settings: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """summary.csv from the tidy runs table: statistics, tests and marks per cell."""
    cfg = resolve_settings(settings)
    missing = {"task", "metric", "fraction", "init", "value"} - set(runs.columns)
    if missing:
        raise ValueError(f"runs table lacks columns {sorted(missing)}")
    keys = [*CELL_KEYS, "init"]
    rows = []
    values: dict[tuple, np.ndarray] = {}
    for key, frame in runs.groupby(keys, sort=True):
        vals = frame["value"].to_numpy(dtype=float)
        values[key] = vals
        rows.append({**dict(zip(keys, key, strict=True)), **describe(vals, cfg["confidence"])})
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
    columns = [*keys, "init", "n", "mean", "std", "best_init", "p_vs_best", "p_vs_best_adj", "mark"]
    return out[columns].sort_values([*keys, "init"], kind="mergesort").reset_index(drop=True)


def settings_arg(text: str) -> dict[str, Any]:
    """argparse type for ``--settings``: a JSON object, with an error that quotes it.

    Same contract as ``medssl.cli.json_arg``, kept here because ``medssl.cli``
    imports torch, which would add seconds to every statistics job for nothing.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text[:80]!r} ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--settings must be a JSON object, got {text[:80]!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medssl.stats",
        description="Per-cell statistics, tests against the best and marks: summary.csv.",
    )
    parser.add_argument("--runs", required=True, help="tidy runs.csv from medssl.aggregate")
    parser.add_argument(
        "--settings",
        type=settings_arg,
        default={},
        help="JSON of the config's stats section (confidence, alpha, test, correction)",
    )
    parser.add_argument("--out", required=True, help="summary.csv to write")
    parser.add_argument(
        "--no-provenance", action="store_true", help="skip the <out>.provenance.json sidecar"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = resolve_settings(args.settings)
    runs = pd.read_csv(args.runs)
    summary = summarise(runs, settings)
    write_csv(args.out, summary)
    if not args.no_provenance:
        out = Path(args.out)
        write_json(out.with_name(out.name + ".provenance.json"), record("stats", settings))
    counts = summary["mark"].value_counts().to_dict()
    log.info("wrote %d rows to %s (marks: %s)", len(summary), args.out, counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
