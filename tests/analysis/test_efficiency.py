"""analysis.efficiency: planted slopes, statsmodels agreement, AUC and drops."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy.integrate import trapezoid

from medssl.analysis.efficiency import (
    EFFICIENCY_MODELS,
    label_efficiency,
    normalised_auc,
    relative_drops,
    task_efficiency,
)
from medssl.core.registry import UnknownNameError

FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)


SEEDS = range(8)


def simulate(slopes: dict[str, float], rng_seed: int = 0, noise: float = 0.01) -> pd.DataFrame:
    """Runs with value = 0.9 + slope * log(f) + seed effect + noise; seed effect shared."""
    rng = np.random.default_rng(rng_seed)
    seed_effect = {s: rng.normal(0, 0.01) for s in SEEDS}
    rows = []
    for init, slope in slopes.items():
        for seed in SEEDS:
            for f in FRACTIONS:
                value = 0.9 + slope * math.log(f) + seed_effect[seed] + rng.normal(0, noise)
                rows.append(
                    {"task": "t", "metric": "auc", "init": init, "fraction": f}
                    | {"seed": seed, "value": value}
                )
    return pd.DataFrame(rows)


SETTINGS = {"reference": "scratch"}


def test_planted_slope_difference_is_detected() -> None:
    out = task_efficiency(simulate({"scratch": 0.05, "spark": 0.02}), SETTINGS).set_index("init")
    assert out.loc["spark", "p_slope_diff"] < 0.05
    assert out.loc["spark", "stars"] in {"*", "**", "***"}
    assert out.loc["spark", "slope_diff"] == pytest.approx(-0.03, abs=0.01)
    assert out.loc["scratch", "slope"] == pytest.approx(0.05, abs=0.01)
    assert out.loc["scratch", "cov_type"] == "cluster"
    assert math.isnan(out.loc["scratch", "p_slope_diff"])


@pytest.mark.parametrize("model", ["ols", "mixedlm"])
def test_equal_slopes_are_not_flagged(model: str) -> None:
    runs = simulate({"scratch": 0.04, "simclr": 0.04, "spark": 0.04}, rng_seed=3)
    out = task_efficiency(runs, {**SETTINGS, "efficiency_model": model}).set_index("init")
    assert (out.loc[["simclr", "spark"], "p_slope_diff_adj"] > 0.05).all()
    assert set(out.loc[["simclr", "spark"], "stars"]) == {"n.s."}


def test_mixedlm_detects_planted_difference() -> None:
    runs = simulate({"scratch": 0.05, "spark": 0.02})
    out = task_efficiency(runs, {**SETTINGS, "efficiency_model": "mixedlm"}).set_index("init")
    assert out.loc["spark", "p_slope_diff"] < 0.05


def test_slopes_match_an_independent_statsmodels_fit() -> None:
    runs = simulate({"scratch": 0.05, "spark": 0.02}, rng_seed=1)
    runs["logf"] = np.log(runs["fraction"])
    # The textbook parameterisation: reference slope + interaction term.
    fit = smf.ols("value ~ C(init, Treatment('scratch')) * logf", runs).fit(
        cov_type="cluster", cov_kwds={"groups": runs["seed"]}, use_t=True
    )
    term = "C(init, Treatment('scratch'))[T.spark]:logf"
    out = task_efficiency(runs, SETTINGS).set_index("init")
    assert out.loc["scratch", "slope"] == pytest.approx(fit.params["logf"])
    assert out.loc["spark", "slope_diff"] == pytest.approx(fit.params[term])
    assert out.loc["spark", "p_slope_diff"] == pytest.approx(fit.pvalues[term])
    low, high = fit.conf_int().loc[term]
    assert out.loc["spark", "slope_diff_ci_low"] == pytest.approx(low)
    assert out.loc["spark", "slope_diff_ci_high"] == pytest.approx(high)


def test_normalised_auc_and_drops() -> None:
    f = np.array([0.1, 0.25, 1.0])
    m = np.array([0.6, 0.7, 0.9])
    expected = trapezoid(m, np.log(f)) / (np.log(1.0) - np.log(0.1))
    assert normalised_auc(f[::-1], m[::-1]) == pytest.approx(expected)
    assert normalised_auc(np.array([0.5]), np.array([0.8])) != normalised_auc(f, m)
    assert math.isnan(normalised_auc(f, np.array([0.6, math.nan, 0.9])))
    drops = relative_drops(f, m, "higher")
    assert drops[0.1] == pytest.approx(0.3 / 0.9)
    assert drops[1.0] == 0.0
    # For a loss, rising from 0.2 to 0.3 is a 50 % drop in quality.
    assert relative_drops(np.array([0.1, 1.0]), np.array([0.3, 0.2]), "lower")[0.1] == (
        pytest.approx(0.5)
    )


def test_table_has_a_drop_column_per_fraction_and_no_reference_means_no_test() -> None:
    runs = simulate({"a": 0.05, "b": 0.02})
    out = label_efficiency(runs, {})
    assert [c for c in out.columns if c.startswith("rel_drop_")] == [
        f"rel_drop_{f:g}" for f in FRACTIONS
    ]
    assert out["p_slope_diff"].isna().all()
    assert out["slope"].notna().all()


def test_missing_columns_are_named() -> None:
    with pytest.raises(ValueError, match="seed"):
        label_efficiency(simulate({"a": 0.0}).drop(columns="seed"))


def test_models_are_a_registry_that_names_the_choices() -> None:
    assert EFFICIENCY_MODELS.names() == ["mixedlm", "ols"]
    with pytest.raises(UnknownNameError, match="unknown stats.efficiency_model 'olss'"):
        label_efficiency(simulate({"scratch": 0.05}), {"efficiency_model": "olss"})
