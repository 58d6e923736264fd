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
the default fit is OLS with cluster-robust standard errors, inference on a t
distribution with (clusters - 1) degrees of freedom; ``efficiency_model:
mixedlm`` fits a linear mixed model with a random intercept per cluster
instead. With a single cluster no clustering is possible and the OLS falls
back to HC1 errors (the ``cov_type`` column says which was used).

**Clusters: fine-tune seeds nested in pre-training runs.** When a pre-trained
init has two or more pre-training runs (``pretrain_seed`` in runs.csv; the
k-th fine-tune seed uses run k mod n), the fine-tunes of one pre-training run
share its encoder as well as their subsets, so a cluster must hold every run
that shares either: the clusters are the connected groups of seeds linked by
a shared (init, pre-training run), :func:`replication_clusters`. With the
usual design that is one cluster per pre-training run index, holding the
seeds that use it, and the degrees of freedom are (pre-training runs - 1):
the slope intervals then carry pre-training variance, as the summary's do.
With one pre-training run per init (or none: scratch, imports) each seed is
its own cluster, as before, and pre-training variance is not measured (the
summary's notes say so). The same clusters are the units of the bootstrap and
of the per-fraction differences (cluster means, paired across inits, since a
cluster fixes the same subsets for every init). ``n_pretrain`` and
``n_clusters`` say how many of each there were.

**Scale.** Bounded scores (AUC, Dice, IoU, accuracy, balanced accuracy, F1;
:data:`medssl.core.directions.LOGIT_METRICS`) have a ceiling: an init that
starts near 1 cannot lose as much in raw units as one that starts at 0.8, so
raw slopes confound efficiency with starting level (two inits with the same
logit-scale slope, offsets 1.5 and 3, have AUC-scale slopes 0.100 and
0.038). By default (``stats.efficiency_scale: logit``) the model is fitted to
``logit(clip(value, eps, 1 - eps))`` with ``eps = stats.logit_eps`` (default
0.001: a perfect score of 1 becomes logit(0.999) = 6.9 rather than infinity);
``raw`` fits the metric itself, and unbounded metrics (loss) are always raw.
The ``scale`` column says which.

**Shape.** With more than three fractions the log-linear shape is tested:
an F test of the model against one with a mean per (init, fraction), both
with a fixed effect per seed (``p_lack_of_fit``). With three fractions or
fewer the test has too few degrees of freedom to say anything and is NaN.

**Per-fraction differences** against the reference (``diff_<f>``, with CI
columns), from the stats test (paired by seed by default), on the raw metric.

Besides the slopes, per init: the normalised area under the mean
label-efficiency curve (trapezoid over log fraction divided by the log-fraction
range, so it is in metric units and comparable across fraction grids) and the
relative drop from the largest fraction to each fraction (positive = worse,
whichever way the metric points), as ``rel_drop_<fraction>`` columns; both
on the raw metric, with percentile intervals from a bootstrap over seeds
(``stats.efficiency_bootstrap`` resamples, seed ``stats.bootstrap_seed``; seeds
resampled jointly for all inits, since one seed fixes every init's subsets).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy.integrate import trapezoid
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components
from statsmodels.tools.sm_exceptions import ConvergenceWarning

from medssl.analysis.comparisons import compare
from medssl.analysis.statistics import adjust, metric_direction, resolve_settings, stars
from medssl.core.directions import LOGIT_METRICS
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
    "scale",
    "cov_type",
    "n_runs",
    "n_seeds",
    "n_pretrain",
    "n_clusters",
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
    "p_lack_of_fit",
    "nauc",
    "nauc_ci_low",
    "nauc_ci_high",
)

SCALES: tuple[str, ...] = ("logit", "raw")
"""``stats.efficiency_scale`` values."""


def _slope_name(init: str) -> str:
    return f"C(init)[{init}]:logf"


def replication_clusters(data: pd.DataFrame) -> pd.Series:
    """Cluster of each run: seeds joined when they share an (init, pre-training run).

    Only inits with two or more pre-training runs join seeds: with one run the
    pre-training noise cannot be measured, and joining would leave a single
    cluster and no inference at all. The clusters are the connected components
    (scipy's) of the graph whose nodes are seeds and whose edges link the seeds
    of one pre-training run.
    """
    seeds, node = np.unique(data["seed"].astype(np.int64).to_numpy(), return_inverse=True)
    edges: list[tuple[int, int]] = []
    if "pretrain_seed" in data.columns:
        nested = data.dropna(subset=["pretrain_seed"])
        runs_per_init = nested.groupby("init")["pretrain_seed"].nunique()
        nested = nested[nested["init"].map(runs_per_init).fillna(0) >= 2]
        position = {int(seed): i for i, seed in enumerate(seeds)}
        for _, linked in nested.groupby(["init", "pretrain_seed"]):
            first, *rest = (position[int(s)] for s in linked["seed"].unique())
            edges += [(first, other) for other in rest]
    pairs = np.array(edges, dtype=np.int64).reshape(-1, 2)
    graph = coo_array(
        (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(seeds.size, seeds.size)
    )
    _, component = connected_components(graph, directed=False)
    return pd.Series(component[node], index=data.index, name="cluster")


def _n_pretrain(data: pd.DataFrame, init: str) -> int:
    if "pretrain_seed" not in data.columns:
        return 0
    return int(data.loc[data["init"] == init, "pretrain_seed"].dropna().nunique())


def _fit_ols(data: pd.DataFrame) -> tuple[Any, str]:
    """OLS, errors clustered (HC1 with one cluster); returns the fit and its covariance."""
    ols = smf.ols(FORMULA, data)
    if data["cluster"].nunique() >= 2:
        fitted = ols.fit(cov_type="cluster", cov_kwds={"groups": data["cluster"]}, use_t=True)
        return fitted, "cluster"
    return ols.fit(cov_type="HC1", use_t=True), "HC1"


def _fit_mixedlm(data: pd.DataFrame) -> tuple[Any, str]:
    """Linear mixed model with a random intercept per cluster (REML)."""
    with warnings.catch_warnings():
        # A seed variance estimated at the boundary (0) is a valid answer
        # with few seeds, not a failure worth a warning per task.
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        fitted = smf.mixedlm(FORMULA, data, groups=data["cluster"]).fit(reml=True)
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
    look_up("stats.efficiency_scale", cfg["efficiency_scale"], SCALES)
    return cfg


def fit_scale(metric: str, cfg: Mapping[str, Any]) -> str:
    """The scale the slopes of ``metric`` are fitted on: logit for bounded scores, else raw."""
    return "logit" if cfg["efficiency_scale"] == "logit" and metric in LOGIT_METRICS else "raw"


def to_scale(values: np.ndarray, scale: str, eps: float) -> np.ndarray:
    """Values on the fitting scale: ``logit(clip(p, eps, 1 - eps))``, or as given (raw)."""
    values = np.asarray(values, dtype=float)
    if scale == "raw":
        return values
    p = np.clip(values, eps, 1 - eps)
    return np.log(p / (1 - p))


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


def _prepared(data: pd.DataFrame, scale: str, eps: float) -> pd.DataFrame:
    """The finite runs of one (task, metric): ``init`` as text, ``logf``, the raw value
    kept as ``raw`` and ``value`` on the fitting scale."""
    data = data[np.isfinite(data["value"].to_numpy(dtype=float))].copy()
    data["init"] = data["init"].astype(str)
    data["logf"] = np.log(data["fraction"].astype(float))
    data["raw"] = data["value"].astype(float)
    data["value"] = to_scale(data["raw"].to_numpy(), scale, eps)
    data["cluster"] = replication_clusters(data)
    return data


def lack_of_fit(data: pd.DataFrame) -> float:
    """p-value of the F test "the log-linear model fits" against a mean per (init, fraction).

    Both models carry a fixed effect per seed, so the shared seed noise does not
    count as misfit. NaN with three fractions or fewer (too few degrees of freedom
    left to detect a curve) or a saturated model.
    """
    if data["fraction"].nunique() <= 3:
        return math.nan
    seeds = "+ C(seed)" if data["seed"].nunique() >= 2 else ""
    linear = smf.ols(f"value ~ 0 + C(init) + C(init):logf {seeds}", data).fit()
    full = smf.ols(f"value ~ 0 + C(init):C(fraction) {seeds}", data).fit()
    if full.df_resid <= 0 or linear.df_resid <= full.df_resid:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, p, _ = full.compare_f_test(linear)
    return float(p)


def fraction_differences(
    data: pd.DataFrame, init: str, reference: str, cfg: Mapping[str, Any]
) -> dict[str, float]:
    """Per fraction, this init's raw mean minus the reference's, with the stats test's CI,
    on cluster means (one per seed unless seeds share a pre-training run)."""
    out: dict[str, float] = {}
    for fraction, frame in data.groupby("fraction", sort=True):
        a = frame[frame["init"] == init].groupby("cluster")["raw"].mean()
        b = frame[frame["init"] == reference].groupby("cluster")["raw"].mean()
        c = compare(a, b, cfg["test"], cfg["confidence"])
        name = diff_column(float(fraction))
        out.update({name: c.estimate, f"{name}_ci_low": c.ci_low, f"{name}_ci_high": c.ci_high})
    return out


def diff_column(fraction: float) -> str:
    """Column of the per-fraction difference to the reference: 0.1 -> 'diff_0.1'."""
    return f"diff_{float(fraction):g}"


def bootstrap_curves(
    data: pd.DataFrame, fractions: np.ndarray, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """Per init, ``n_boot`` mean curves (rows) over ``fractions`` with clusters resampled
    jointly (a cluster is a seed unless seeds share a pre-training run).

    A cluster missing a fraction contributes nothing to that fraction's mean
    (``nanmean``); a resample without any value there gives NaN.
    """
    clusters = np.array(sorted(data["cluster"].unique()))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, clusters.size, size=(n_boot, clusters.size))
    out = {}
    for init, frame in data.groupby("init", sort=True):
        table = frame.pivot_table(index="cluster", columns="fraction", values="raw", aggfunc="mean")
        matrix = table.reindex(index=clusters, columns=fractions).to_numpy(dtype=float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[str(init)] = np.nanmean(matrix[picks], axis=1)
    return out


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _bootstrap_columns(
    curves: np.ndarray, fractions: np.ndarray, direction: str, confidence: float
) -> dict[str, float]:
    """Percentile intervals of nauc and the relative drops from bootstrap mean curves."""
    nauc = np.array([normalised_auc(fractions, c) for c in curves])
    low, high = _interval(nauc, confidence)
    out = {"nauc_ci_low": low, "nauc_ci_high": high}
    drops = [relative_drops(fractions, c, direction) for c in curves]
    for f in fractions:
        low, high = _interval(np.array([d[float(f)] for d in drops]), confidence)
        out[f"{drop_column(f)}_ci_low"], out[f"{drop_column(f)}_ci_high"] = low, high
    return out


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
    metric = str(data["metric"].iloc[0])
    scale = fit_scale(metric, cfg)
    data = _prepared(data, scale, cfg["logit_eps"])
    task = str(data["task"].iloc[0])
    inits = sorted(data["init"].unique())
    reference = cfg["reference"] if cfg["reference"] in inits else None
    direction = metric_direction(metric, cfg.get("directions"))
    means = data.groupby(["init", "fraction"])["raw"].mean()
    fractions = np.array(sorted(data["fraction"].astype(float).unique()))
    alpha = 1 - cfg["confidence"]
    fitted, cov_type = _fit_slopes(data, cfg["efficiency_model"])
    p_fit = lack_of_fit(data) if fitted is not None else math.nan
    curves = (
        bootstrap_curves(data, fractions, cfg["efficiency_bootstrap"], cfg["bootstrap_seed"])
        if cfg["efficiency_bootstrap"] > 0
        else {}
    )
    rows = []
    for init in inits:
        curve = means.loc[init].reindex(fractions)
        row: dict[str, Any] = {
            "task": task,
            "metric": metric,
            "init": init,
            "reference": reference,
            "model": cfg["efficiency_model"],
            "scale": scale,
            "cov_type": cov_type,
            "n_runs": int((data["init"] == init).sum()),
            "n_seeds": int(data.loc[data["init"] == init, "seed"].nunique()),
            "n_pretrain": _n_pretrain(data, init),
            "n_clusters": int(data.loc[data["init"] == init, "cluster"].nunique()),
            "nauc": normalised_auc(fractions, curve.to_numpy()),
        }
        row.update(
            dict.fromkeys(COLUMNS[COLUMNS.index("slope") : COLUMNS.index("stars")], math.nan)
        )
        row.update(stars="", p_lack_of_fit=p_fit, nauc_ci_low=math.nan, nauc_ci_high=math.nan)
        if fitted is not None:
            row.update(_slope_columns(fitted, init, reference, alpha))
        drops = relative_drops(fractions, curve.to_numpy(), direction)
        row.update({drop_column(f): v for f, v in drops.items()})
        if init in curves:
            row.update(_bootstrap_columns(curves[init], fractions, direction, cfg["confidence"]))
        if reference is not None and init != reference:
            row.update(fraction_differences(data, init, reference, cfg))
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
    return out[[*COLUMNS, *_per_fraction_columns(out.columns)]]


def _per_fraction_columns(columns: Sequence[str]) -> list[str]:
    """The ``rel_drop_<f>`` and ``diff_<f>`` columns (with their CIs), by kind then fraction."""

    def key(name: str) -> tuple[int, float, int]:
        kind = 0 if name.startswith("rel_drop_") else 1
        stem = name.removeprefix("rel_drop_").removeprefix("diff_")
        suffix = 1 if stem.endswith("_ci_low") else 2 if stem.endswith("_ci_high") else 0
        stem = stem.removesuffix("_ci_low").removesuffix("_ci_high")
        return kind, float(stem), suffix

    chosen = [c for c in columns if c.startswith(("rel_drop_", "diff_")) and c not in COLUMNS]
    return sorted(chosen, key=key)
