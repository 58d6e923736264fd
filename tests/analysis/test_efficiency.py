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
    replication_clusters,
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


SETTINGS = {"reference": "scratch", "efficiency_scale": "raw"}
"""These planted slopes are in raw AUC units, away from the ceiling."""


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
    out = label_efficiency(runs, {"efficiency_scale": "raw"})
    drops = [
        c for c in out.columns if c.startswith("rel_drop_") and not c.endswith(("_low", "_high"))
    ]
    assert drops == [f"rel_drop_{f:g}" for f in FRACTIONS]
    assert out["p_slope_diff"].isna().all()
    assert out["slope"].notna().all()


def test_missing_columns_are_named() -> None:
    with pytest.raises(ValueError, match="seed"):
        label_efficiency(simulate({"a": 0.0}).drop(columns="seed"))


def test_models_are_a_registry_that_names_the_choices() -> None:
    assert EFFICIENCY_MODELS.names() == ["mixedlm", "ols"]
    with pytest.raises(UnknownNameError, match="unknown stats.efficiency_model 'olss'"):
        label_efficiency(simulate({"scratch": 0.05}), {"efficiency_model": "olss"})


def _ceiling_runs(offsets: dict[str, float], logit_slope: float = 0.6) -> pd.DataFrame:
    """AUC = expit(offset + logit_slope * log f) + noise on the logit scale, 8 seeds."""
    rng = np.random.default_rng(7)
    rows = []
    for init, offset in offsets.items():
        for seed in SEEDS:
            for f in FRACTIONS:
                z = offset + logit_slope * math.log(f) + rng.normal(0, 0.1)
                rows.append(
                    {"task": "t", "metric": "auc", "init": init, "fraction": f}
                    | {"seed": seed, "value": 1 / (1 + math.exp(-z))}
                )
    return pd.DataFrame(rows)


def test_the_ceiling_case_is_not_flagged_on_the_logit_scale() -> None:
    runs = _ceiling_runs({"a": 1.5, "b": 3.0})
    logit = task_efficiency(runs, {"reference": "a"}).set_index("init")
    assert set(logit["scale"]) == {"logit"}
    assert logit.loc["b", "p_slope_diff"] > 0.05
    assert logit.loc["a", "slope"] == pytest.approx(0.6, abs=0.05)
    raw = task_efficiency(runs, {"reference": "a", "efficiency_scale": "raw"}).set_index("init")
    assert raw.loc["b", "p_slope_diff"] < 0.001  # the ceiling, read as a difference
    assert raw.loc["b", "slope"] < 0.5 * raw.loc["a", "slope"]


def test_a_planted_logit_slope_difference_is_flagged() -> None:
    runs = pd.concat(
        [
            _ceiling_runs({"a": 1.5}, logit_slope=0.6),
            _ceiling_runs({"b": 1.5}, logit_slope=0.3),
        ]
    )
    out = task_efficiency(runs, {"reference": "a"}).set_index("init")
    assert out.loc["b", "p_slope_diff"] < 0.001
    assert out.loc["b", "slope_diff"] == pytest.approx(-0.3, abs=0.05)


def test_lack_of_fit_flags_a_curve_and_not_a_line() -> None:
    line = task_efficiency(_ceiling_runs({"a": 3.0}), {})
    assert line["p_lack_of_fit"].iloc[0] > 0.05
    raw = task_efficiency(_ceiling_runs({"a": 3.0}), {"efficiency_scale": "raw"})
    assert raw["p_lack_of_fit"].iloc[0] < 0.001  # a sigmoid is not linear in raw units
    three = _ceiling_runs({"a": 1.5})
    three = three[three["fraction"].isin([0.1, 0.25, 0.5])]
    assert math.isnan(task_efficiency(three, {})["p_lack_of_fit"].iloc[0])


def test_nauc_drops_and_per_fraction_differences_carry_intervals() -> None:
    runs = simulate({"scratch": 0.05, "spark": 0.02})
    out = task_efficiency(runs, {**SETTINGS, "efficiency_bootstrap": 300}).set_index("init")
    spark = out.loc["spark"]
    assert spark["nauc_ci_low"] < spark["nauc"] < spark["nauc_ci_high"]
    assert spark["rel_drop_0.05_ci_low"] < spark["rel_drop_0.05"] < spark["rel_drop_0.05_ci_high"]
    per_seed = runs[runs["fraction"] == 0.05].pivot(index="seed", columns="init", values="value")
    d = per_seed["spark"] - per_seed["scratch"]
    assert spark["diff_0.05"] == pytest.approx(d.mean())
    assert spark["diff_0.05_ci_low"] < d.mean() < spark["diff_0.05_ci_high"]
    assert math.isnan(out.loc["scratch", "diff_0.05"])
    off = task_efficiency(runs, {**SETTINGS, "efficiency_bootstrap": 0})
    assert off["nauc_ci_low"].isna().all()


def test_losses_stay_on_the_raw_scale() -> None:
    runs = simulate({"a": 0.05})
    runs["metric"] = "loss"
    assert set(task_efficiency(runs, {})["scale"]) == {"raw"}


def test_seeds_that_share_a_pre_training_run_form_one_cluster() -> None:
    runs = simulate({"scratch": 0.04, "spark": 0.04, "imagenet": 0.04})
    runs["pretrain_seed"] = pd.array(
        np.where(runs["init"] == "spark", runs["seed"] % 2, -1), dtype="Int64"
    )
    runs.loc[runs["init"] == "imagenet", "pretrain_seed"] = 0  # one run: nothing to join
    runs.loc[runs["init"] == "scratch", "pretrain_seed"] = pd.NA
    clusters = replication_clusters(runs)
    by_seed = dict(zip(runs["seed"], clusters, strict=True))
    assert len(set(by_seed.values())) == 2
    assert len({by_seed[s] for s in (0, 2, 4, 6)}) == 1 and by_seed[0] != by_seed[1]
    out = task_efficiency(runs, SETTINGS).set_index("init")
    assert out.loc["spark", "n_pretrain"] == 2 and out.loc["imagenet", "n_pretrain"] == 1
    assert set(out["n_clusters"]) == {2}
    assert runs.drop(columns="pretrain_seed").pipe(replication_clusters).nunique() == 8


def nested_runs(rng: np.random.Generator, n_pretrain: int = 3, seeds: int = 9) -> pd.DataFrame:
    """Equal true slopes; each pre-training run of ``spark`` shifts its slope at random."""
    run_slope = rng.normal(0, 0.02, n_pretrain)
    seed_effect = rng.normal(0, 0.01, seeds)
    rows = []
    for init in ("scratch", "spark"):
        for seed in range(seeds):
            pseed = seed % n_pretrain if init == "spark" else None
            slope = 0.04 + (run_slope[pseed] if pseed is not None else 0.0)
            for f in FRACTIONS:
                value = 0.8 + slope * math.log(f) + seed_effect[seed] + rng.normal(0, 0.005)
                rows.append(
                    {"task": "t", "metric": "auc", "init": init, "fraction": f, "seed": seed}
                    | {"value": value, "pretrain_seed": pseed}
                )
    frame = pd.DataFrame(rows)
    frame["pretrain_seed"] = frame["pretrain_seed"].astype("Int64")
    return frame


def test_nested_clusters_hold_the_false_positive_rate_that_seed_clusters_break() -> None:
    """With pre-training noise on the slope, clustering by seed alone treats 9 fine-tunes
    of 3 encoders as 9 independent runs and flags equal slopes far too often."""
    rng = np.random.default_rng(11)
    nested, by_seed = [], []
    settings = {**SETTINGS, "efficiency_bootstrap": 0}
    for _ in range(150):
        runs = nested_runs(rng)
        nested.append(task_efficiency(runs, settings).set_index("init").loc["spark"])
        flat = task_efficiency(runs.drop(columns="pretrain_seed"), settings)
        by_seed.append(flat.set_index("init").loc["spark"])
    nested_rate = np.mean([row["p_slope_diff"] < 0.05 for row in nested])
    seed_rate = np.mean([row["p_slope_diff"] < 0.05 for row in by_seed])
    assert nested_rate <= 0.12
    assert seed_rate >= 0.3
    assert nested[0]["n_clusters"] == 3
