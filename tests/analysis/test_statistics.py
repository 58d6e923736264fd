"""analysis.statistics: summary statistics, tests against the best and marks.

Each is checked against an independent computation (scipy, statsmodels, loops).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from medssl.analysis.statistics import (
    CORRECTIONS,
    DEFAULT_SETTINGS,
    SUMMARY_COLUMNS,
    TESTS,
    adjust,
    metric_direction,
    summarise,
    summary_from_published,
    two_sample_p,
)
from medssl.core.registry import UnknownNameError
from tests.analysis.frames import VALUES, runs_of

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
PUBLISHED = Path(__file__).resolve().parents[3] / "shared/data/taher2021_domain_adaptive.csv"


def _row(summary: pd.DataFrame, init: str) -> pd.Series:
    return summary[summary["init"] == init].iloc[0]


def test_columns_and_descriptives_match_numpy_scipy() -> None:
    summary = summarise(runs_of(VALUES), {"confidence": 0.9})
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    for init, vals in VALUES.items():
        x = np.array(vals)
        row = _row(summary, init)
        assert row["n"] == len(x)
        assert row["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert row["std"] == pytest.approx(x.std(ddof=1), rel=1e-12)
        assert row["sem"] == pytest.approx(sps.sem(x), rel=1e-12)
        low, high = sps.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
        assert row["ci_low"] == pytest.approx(low, rel=1e-12)
        assert row["ci_high"] == pytest.approx(high, rel=1e-12)
        assert row["median"] == pytest.approx(np.median(x), rel=1e-12)


def test_p_values_equal_scipy_welch_and_holm_matches_statsmodels() -> None:
    summary = summarise(runs_of(VALUES))
    expected = {
        init: sps.ttest_ind(VALUES[init], VALUES["good"], equal_var=False).pvalue
        for init in ("close", "bad")
    }
    for init, p in expected.items():
        assert _row(summary, init)["p_vs_best"] == pytest.approx(p, rel=1e-12)
    assert math.isnan(_row(summary, "good")["p_vs_best"])
    # Holm within the cell, over the two comparisons actually made.
    order = ["bad", "close"]
    holm = multipletests([expected[i] for i in order], method="holm")[1]
    for init, p_adj in zip(order, holm, strict=True):
        assert _row(summary, init)["p_vs_best_adj"] == pytest.approx(p_adj, rel=1e-12)


def test_student_and_fdr_settings_are_used() -> None:
    summary = summarise(runs_of(VALUES), {"test": "student", "correction": "fdr_bh"})
    p = {
        i: sps.ttest_ind(VALUES[i], VALUES["good"], equal_var=True).pvalue for i in ("bad", "close")
    }
    bh = multipletests([p["bad"], p["close"]], method="fdr_bh")[1]
    assert _row(summary, "bad")["p_vs_best"] == pytest.approx(p["bad"], rel=1e-12)
    assert _row(summary, "bad")["p_vs_best_adj"] == pytest.approx(bh[0], rel=1e-12)
    assert _row(summary, "close")["p_vs_best_adj"] == pytest.approx(bh[1], rel=1e-12)


def test_marks_on_constructed_cell() -> None:
    summary = summarise(runs_of(VALUES))
    assert set(summary["best_init"]) == {"good"}
    assert dict(zip(summary["init"], summary["mark"], strict=True)) == {
        "good": "best",
        "close": "equivalent",
        "bad": "worse",
    }


def test_cells_are_separate_and_order_is_deterministic() -> None:
    runs = pd.concat(
        [
            runs_of(VALUES, fraction=0.5),
            runs_of({"good": [0.5, 0.52, 0.51], "bad": [0.8, 0.81, 0.79]}, fraction=0.1),
            runs_of(VALUES, task="region"),
        ]
    )
    a = summarise(runs)
    b = summarise(runs.sample(frac=1.0, random_state=0))
    pd.testing.assert_frame_equal(a, b)
    assert a[["task", "fraction", "init"]].values.tolist()[:2] == [
        ["nodule", 0.1, "bad"],
        ["nodule", 0.1, "good"],
    ]
    assert _row(a[a["fraction"] == 0.1], "bad")["mark"] == "best"


def test_degenerate_cells_give_nan_and_equivalent() -> None:
    runs = runs_of({"a": [0.8, 0.8, 0.8], "b": [0.8, 0.8, 0.8], "c": [0.6], "d": [0.7, math.nan]})
    summary = summarise(runs)
    a, b, c, d = (_row(summary, i) for i in "abcd")
    assert a["mark"] == "best"  # tie on the mean goes to the name that sorts first
    assert math.isnan(b["p_vs_best"]) and b["mark"] == "equivalent"
    assert c["n"] == 1 and math.isnan(c["std"]) and math.isnan(c["ci_low"])
    assert c["mark"] == "equivalent"
    assert d["n"] == 1 and d["mean"] == pytest.approx(0.7)  # NaN run counted out
    assert math.isnan(two_sample_p([1.0, 1.0], [2.0, 2.0]))


def test_adjust_ignores_nan() -> None:
    p = [0.01, math.nan, 0.04]
    out = adjust(p, "holm")
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], multipletests([0.01, 0.04], method="holm")[1])
    np.testing.assert_allclose(adjust(p, "none")[[0, 2]], [0.01, 0.04])


def test_metric_direction() -> None:
    assert metric_direction("auc") == "higher"
    assert metric_direction("loss") == "lower"
    assert metric_direction("mean AUC (%)") == "higher"
    assert metric_direction("Dice (%)") == "higher"
    assert metric_direction("widget", {"widget": "lower"}) == "lower"
    with pytest.raises(ValueError, match="widget"):
        metric_direction("widget")


def test_lower_is_better_metric_picks_lowest_mean() -> None:
    runs = runs_of({"x": [0.2, 0.21, 0.19], "y": [0.5, 0.52, 0.49]})
    runs["metric"] = "loss"
    summary = summarise(runs)
    assert set(summary["best_init"]) == {"x"}


def test_bad_settings_fail_loudly() -> None:
    with pytest.raises(ValueError, match="correction"):
        summarise(runs_of(VALUES), {"correction": "bonferroni-ish"})


def test_from_published_matches_ttest_ind_from_stats() -> None:
    table = pd.DataFrame(
        {
            "task": "t",
            "metric": "auc",
            "init": ["a", "b"],
            "mean": [0.9, 0.85],
            "std": [0.01, 0.02],
            "n": [10, 10],
        }
    )
    out = summary_from_published(table, std_ddof=0)
    k = math.sqrt(10 / 9)
    p = sps.ttest_ind_from_stats(0.85, 0.02 * k, 10, 0.9, 0.01 * k, 10, equal_var=False).pvalue
    assert out.loc[out["init"] == "b", "p_vs_best"].iloc[0] == pytest.approx(p, rel=1e-12)
    assert out.loc[out["init"] == "b", "std"].iloc[0] == pytest.approx(0.02 * k)


@pytest.mark.skipif(
    not PUBLISHED.is_file(), reason=f"published table not found at {PUBLISHED} (../shared/data)"
)
def test_taher2021_published_table() -> None:
    table = pd.read_csv(PUBLISHED)
    out = summary_from_published(table, std_ddof=0)
    txc = out[out["task"] == "TXC"].set_index("init")
    assert set(txc["best_init"]) == {"ImageNet->ChestX-ray14"}
    assert txc.loc["ImageNet->ChestX-ray14", "mark"] == "best"
    assert txc.loc["ImageNet->ChestX-ray14", "mean"] == pytest.approx(98.47)
    assert txc.loc["Scratch", "mark"] == "worse"
    assert txc.loc["Scratch", "p_vs_best_adj"] < 1e-6
    # Every cell has exactly one best, and every row a mark.
    assert (out.groupby("task")["mark"].apply(lambda m: (m == "best").sum()) == 1).all()
    assert set(out["mark"]) <= {"best", "equivalent", "worse"}


@pytest.mark.parametrize(
    ("test", "scipy_p"),
    [
        ("welch", lambda x, y: sps.ttest_ind(x, y, equal_var=False).pvalue),
        ("student", lambda x, y: sps.ttest_ind(x, y).pvalue),
        ("paired", lambda x, y: sps.ttest_rel(x, y).pvalue),
        ("wilcoxon", lambda x, y: sps.wilcoxon(x, y).pvalue),
    ],
)
def test_reference_comparison_matches_scipy(test: str, scipy_p) -> None:
    # Seeds listed in a shuffled order: the paired tests must match by seed.
    runs = runs_of(VALUES).sample(frac=1.0, random_state=0)
    summary = summarise(runs, {"test": test, "reference": "bad", "correction": "none"})
    for init in ("good", "close"):
        row = _row(summary, init)
        assert row["reference"] == "bad"
        assert row["p_vs_ref"] == pytest.approx(scipy_p(VALUES[init], VALUES["bad"]))
    ref = _row(summary, "bad")
    assert math.isnan(ref["p_vs_ref"]) and ref["stars"] == ""


def test_reference_p_values_are_corrected_and_starred() -> None:
    summary = summarise(runs_of(VALUES), {"reference": "bad", "correction": "holm"})
    raw = [_row(summary, i)["p_vs_ref"] for i in ("close", "good")]
    adjusted = [_row(summary, i)["p_vs_ref_adj"] for i in ("close", "good")]
    np.testing.assert_allclose(adjusted, multipletests(raw, method="holm")[1])
    assert _row(summary, "good")["stars"] == "***"


def test_stars_thresholds() -> None:
    from medssl.analysis.statistics import stars

    assert [stars(p) for p in (0.0005, 0.005, 0.03, 0.2, math.nan)] == [
        "***",
        "**",
        "*",
        "n.s.",
        "",
    ]


def test_bootstrap_ci_matches_scipy_and_is_reproducible() -> None:
    settings = {"bootstrap": 500, "bootstrap_seed": 7, "confidence": 0.9}
    summary = summarise(runs_of(VALUES), settings)
    res = sps.bootstrap(
        (np.array(VALUES["good"]),),
        np.mean,
        n_resamples=500,
        confidence_level=0.9,
        method="percentile",
        rng=np.random.default_rng(7),
    )
    row = _row(summary, "good")
    assert row["ci_low"] == pytest.approx(res.confidence_interval.low)
    assert row["ci_high"] == pytest.approx(res.confidence_interval.high)
    pd.testing.assert_frame_equal(summary, summarise(runs_of(VALUES), settings))


def test_paired_test_refuses_summary_statistics() -> None:
    table = pd.DataFrame(
        {"task": "t", "metric": "auc", "init": ["a", "b"], "mean": [0.9, 0.8]}
        | {"std": [0.01, 0.02], "n": [10, 10]}
    )
    with pytest.raises(ValueError, match="paired"):
        summary_from_published(table, {"test": "paired"})


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="stats.bootstrap"):
        summarise(runs_of(VALUES), {"bootstrap": -1})
    with pytest.raises(ValueError, match="stats.test"):
        summarise(runs_of(VALUES), {"test": "anova"})


def test_schema_defaults_of_the_stats_section_equal_the_code() -> None:
    """Every key the schema's ``stats`` section defaults, the code defaults to the same value."""
    section = yaml.safe_load(SCHEMA.read_text())["properties"]["stats"]["properties"]
    schema_defaults = {key: spec["default"] for key, spec in section.items() if "default" in spec}
    assert schema_defaults == DEFAULT_SETTINGS


def test_the_schema_lists_the_registered_tests_and_corrections() -> None:
    section = yaml.safe_load(SCHEMA.read_text())["properties"]["stats"]["properties"]
    assert sorted(section["test"]["enum"]) == TESTS.names()
    assert sorted(section["correction"]["enum"]) == CORRECTIONS.names()


def test_unknown_names_give_the_known_ones_and_a_close_match() -> None:
    with pytest.raises(
        UnknownNameError, match="unknown stats.correction 'hlom'; did you mean 'holm'"
    ):
        summarise(runs_of(VALUES), {"correction": "hlom"})
    with pytest.raises(UnknownNameError, match="known: paired, student, welch, wilcoxon"):
        two_sample_p([1.0, 2.0], [1.5, 2.5], "anova")
    with pytest.raises(UnknownNameError, match="stats.directions value 'up'"):
        summarise(runs_of(VALUES), {"directions": {"auc": "up"}})
    with pytest.raises(UnknownNameError, match="unknown metric 'widget'.*stats.directions"):
        metric_direction("widget")
