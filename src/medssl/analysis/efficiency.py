"""Label efficiency: how fast each initialisation loses performance as labels shrink.

The table of stage ``efficiency`` (``label_efficiency.csv``).

Study A's claim ("SparK degrades less with fewer labels") is a claim about
slopes, so per task and metric one linear model of the test metric against the
log training fraction is fitted to every run, with the initialisation as a
factor and the interaction::

    value ~ 0 + C(init) + C(init):log(fraction)

This is the same model as ``value ~ C(init) * log(fraction)``, parameterised so
that each init's own intercept and slope are coefficients; the slope difference
against the reference init is then a linear contrast (``t_test``). Runs of one
seed share their training subsets and split, so their errors are correlated:
the default fit is OLS with cluster-robust (by seed) standard errors, inference
on a t distribution with (seeds - 1) degrees of freedom; ``efficiency_model:
mixedlm`` fits a linear mixed model with a random intercept per seed instead.
With a single seed no clustering is possible and the OLS falls back to HC1
errors (the ``cov_type`` column says which was used).

Besides the slopes, per init: the normalised area under the mean
label-efficiency curve (trapezoid over log fraction divided by the log-fraction
range, so it is in metric units and comparable across fraction grids) and the
relative drop from the largest fraction to each fraction (positive = worse,
whichever way the metric points), as ``rel_drop_<fraction>`` columns.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy.integrate import trapezoid
from statsmodels.tools.sm_exceptions import ConvergenceWarning

from medssl.analysis.statistics import adjust, metric_direction, resolve_settings, stars
from medssl.core.registry import Registry, look_up

log = logging.getLogger(__name__)

FORMULA = "value ~ 0 + C(init) + C(init):logf"
"""``logf`` is ``log(fraction)``; one intercept and one slope per init."""

COLUMNS: tuple[str, ...] = (
    "task",
    "metric",
    "init",
    "reference",
    "model",
    "cov_type",
    "n_runs",
    "n_seeds",
    "slope",
    "slope_se",
    "slope_ci_low",
    "slope_ci_high",
    "slope_diff",
    "slope_diff_ci_low",
    "slope_diff_ci_high",
    "p_slope_diff",
    "p_slope_diff_adj",
    "stars",
    "nauc",
)


def _slope_name(init: str) -> str:
    return f"C(init)[{init}]:logf"


def _fit_ols(data: pd.DataFrame) -> tuple[Any, str]:
    """OLS, errors clustered by seed (HC1 with one seed); returns the fit and its covariance."""
    ols = smf.ols(FORMULA, data)
    if data["seed"].nunique() >= 2:
        fitted = ols.fit(cov_type="cluster", cov_kwds={"groups": data["seed"]}, use_t=True)
        return fitted, "cluster"
    return ols.fit(cov_type="HC1", use_t=True), "HC1"


def _fit_mixedlm(data: pd.DataFrame) -> tuple[Any, str]:
    """Linear mixed model with a random intercept per seed (REML)."""
    with warnings.catch_warnings():
        # A seed variance estimated at the boundary (0) is a valid answer
        # with few seeds, not a failure worth a warning per task.
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        fitted = smf.mixedlm(FORMULA, data, groups=data["seed"]).fit(reml=True)
    return fitted, "mixedlm"


EfficiencyFit = Callable[[pd.DataFrame], tuple[Any, str]]

EFFICIENCY_MODELS: Registry[EfficiencyFit] = Registry(
    "stats.efficiency_model", {"ols": _fit_ols, "mixedlm": _fit_mixedlm}
)
"""``stats.efficiency_model`` -> the fit: ``(runs with logf) -> (results, covariance used)``."""


def efficiency_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The stats settings, with ``efficiency_model`` checked against :data:`EFFICIENCY_MODELS`."""
    cfg = resolve_settings(settings)
    look_up("stats.efficiency_model", cfg["efficiency_model"], EFFICIENCY_MODELS)
    return cfg


def _contrast(fitted: Any, weights: Mapping[str, float], alpha: float) -> dict[str, float]:
    """Estimate, CI and p-value of one linear combination of named coefficients."""
    names = list(fitted.model.exog_names)
    # One row over the fixed effects only (MixedLM's params also hold the
    # random-effect variance, which its t_test does not take).
    vector = np.zeros((1, len(names)))
    for name, weight in weights.items():
        vector[0, names.index(name)] = weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = fitted.t_test(vector)
    low, high = np.asarray(res.conf_int(alpha=alpha)).ravel()
    return {
        "estimate": float(np.squeeze(res.effect)),
        "se": float(np.squeeze(res.sd)),
        "low": float(low),
        "high": float(high),
        "p": float(np.squeeze(res.pvalue)),
    }


def normalised_auc(fractions: np.ndarray, means: np.ndarray) -> float:
    """Trapezoid area under ``means`` over log fraction, divided by the log range.

    NaN with fewer than two fractions (no range) or a missing mean (the curve
    would silently shrink to the fractions that happen to exist).
    """
    order = np.argsort(fractions)
    x = np.log(np.asarray(fractions, dtype=float)[order])
    y = np.asarray(means, dtype=float)[order]
    if x.size < 2 or not np.all(np.isfinite(y)) or x[-1] == x[0]:
        return math.nan
    return float(trapezoid(y, x) / (x[-1] - x[0]))


def relative_drops(fractions: np.ndarray, means: np.ndarray, direction: str) -> dict[float, float]:
    """Relative loss from the largest fraction's mean to each fraction's (positive = worse)."""
    order = np.argsort(fractions)
    f = np.asarray(fractions, dtype=float)[order]
    m = np.asarray(means, dtype=float)[order]
    top = m[-1]
    sign = 1.0 if direction == "higher" else -1.0
    if not math.isfinite(top) or top == 0:
        return {float(x): math.nan for x in f}
    return {float(x): float(sign * (top - y) / abs(top)) for x, y in zip(f, m, strict=True)}


def drop_column(fraction: float) -> str:
    """Column name of the relative drop at one fraction: 0.1 -> 'rel_drop_0.1'."""
    return f"rel_drop_{float(fraction):g}"


def _prepared(data: pd.DataFrame) -> pd.DataFrame:
    """The finite runs of one (task, metric), with ``init`` as text and ``logf``."""
    data = data[np.isfinite(data["value"].to_numpy(dtype=float))].copy()
    data["init"] = data["init"].astype(str)
    data["logf"] = np.log(data["fraction"].astype(float))
    return data


def _fit_slopes(data: pd.DataFrame, model: str) -> tuple[Any, str]:
    """The fitted model, or ``(None, "")`` when an init has fewer than two fractions."""
    fractions = data["fraction"].nunique()
    per_init_fractions = data.groupby("init")["fraction"].nunique()
    if fractions >= 2 and (per_init_fractions >= 2).all():
        return EFFICIENCY_MODELS[model](data)
    task, metric = str(data["task"].iloc[0]), str(data["metric"].iloc[0])
    log.warning("%s/%s: an init has fewer than two fractions; no slopes", task, metric)
    return None, ""


def _slope_columns(fitted: Any, init: str, reference: str | None, alpha: float) -> dict[str, float]:
    """The init's slope with its CI, and its difference from the reference's slope."""
    slope = _contrast(fitted, {_slope_name(init): 1.0}, alpha)
    columns = {
        "slope": slope["estimate"],
        "slope_se": slope["se"],
        "slope_ci_low": slope["low"],
        "slope_ci_high": slope["high"],
    }
    if reference is not None and init != reference:
        diff = _contrast(fitted, {_slope_name(init): 1.0, _slope_name(reference): -1.0}, alpha)
        columns.update(
            slope_diff=diff["estimate"],
            slope_diff_ci_low=diff["low"],
            slope_diff_ci_high=diff["high"],
            p_slope_diff=diff["p"],
        )
    return columns


def task_efficiency(data: pd.DataFrame, settings: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Rows of label_efficiency.csv for one (task, metric): one per init."""
    cfg = efficiency_settings(settings)
    data = _prepared(data)
    task, metric = str(data["task"].iloc[0]), str(data["metric"].iloc[0])
    inits = sorted(data["init"].unique())
    reference = cfg["reference"] if cfg["reference"] in inits else None
    direction = metric_direction(metric, cfg.get("directions"))
    means = data.groupby(["init", "fraction"])["value"].mean()
    fractions = np.array(sorted(data["fraction"].astype(float).unique()))
    alpha = 1 - cfg["confidence"]
    fitted, cov_type = _fit_slopes(data, cfg["efficiency_model"])
    rows = []
    for init in inits:
        curve = means.loc[init].reindex(fractions)
        row: dict[str, Any] = {
            "task": task,
            "metric": metric,
            "init": init,
            "reference": reference,
            "model": cfg["efficiency_model"],
            "cov_type": cov_type,
            "n_runs": int((data["init"] == init).sum()),
            "n_seeds": int(data.loc[data["init"] == init, "seed"].nunique()),
            "nauc": normalised_auc(fractions, curve.to_numpy()),
        }
        row.update(dict.fromkeys(COLUMNS[8:18], math.nan))
        row["stars"] = ""
        if fitted is not None:
            row.update(_slope_columns(fitted, init, reference, alpha))
        drops = relative_drops(fractions, curve.to_numpy(), direction)
        row.update({drop_column(f): v for f, v in drops.items()})
        rows.append(row)
    out = pd.DataFrame(rows)
    out["p_slope_diff_adj"] = adjust(out["p_slope_diff"].to_numpy(), cfg["correction"])
    out["stars"] = [stars(p) for p in out["p_slope_diff_adj"]]
    return out


def label_efficiency(runs: pd.DataFrame, settings: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """label_efficiency.csv from the tidy runs table: every (task, metric), every init."""
    settings = efficiency_settings(settings)
    missing = {"task", "metric", "fraction", "init", "seed", "value"} - set(runs.columns)
    if missing:
        raise ValueError(f"runs table lacks columns {sorted(missing)}")
    parts = [
        task_efficiency(frame, settings)
        for _, frame in runs.groupby(["task", "metric"], sort=True)
        if np.isfinite(frame["value"].to_numpy(dtype=float)).any()
    ]
    if not parts:
        return pd.DataFrame(columns=list(COLUMNS))
    out = pd.concat(parts, ignore_index=True)
    drops = sorted(
        (c for c in out.columns if c.startswith("rel_drop_")),
        key=lambda c: float(c.removeprefix("rel_drop_")),
    )
    return out[[*COLUMNS, *drops]]
