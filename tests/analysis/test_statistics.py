"""analysis.statistics: descriptives, units, MCB marks, TOST, notes, published tables.

Numbers are checked against independent computations (scipy, statsmodels,
loops); what the methods promise (error rates, equivalence only inside the
margin, nesting) is checked by small fixed-seed simulations.
"""

from __future__ import annotations

import math
import os
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
STUDY_B_TASKS = {"DXC14", "DXC5", "TXC", "LXS", "PXS"}
QUICK = {"best_bootstrap": 0}
"""Settings for tests that do not look at p_best (the bootstrap costs time)."""


def _row(summary: pd.DataFrame, init: str) -> pd.Series:
    return summary[summary["init"] == init].iloc[0]


def test_columns_and_descriptives_match_numpy_scipy() -> None:
    summary = summarise(runs_of(VALUES), {"confidence": 0.9})
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    for init, vals in VALUES.items():
        x = np.array(vals)
        row = _row(summary, init)
        assert row["n"] == len(x) and row["n_units"] == len(x) and row["unit"] == "seed"
        assert row["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert row["std"] == pytest.approx(x.std(ddof=1), rel=1e-12)
        assert row["sem"] == pytest.approx(sps.sem(x), rel=1e-12)
        low, high = sps.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
        assert row["ci_low"] == pytest.approx(low, rel=1e-12)
        assert row["ci_high"] == pytest.approx(high, rel=1e-12)
        assert row["median"] == pytest.approx(np.median(x), rel=1e-12)


def test_the_default_test_is_paired_and_differences_carry_intervals() -> None:
    assert DEFAULT_SETTINGS["test"] == "paired"
    summary = summarise(runs_of(VALUES), {"reference": "bad", "correction": "none", **QUICK})
    close = _row(summary, "close")
    d = np.array(VALUES["close"]) - np.array(VALUES["bad"])
    assert close["p_vs_ref"] == pytest.approx(sps.ttest_rel(VALUES["close"], VALUES["bad"]).pvalue)
    low, high = sps.t.interval(0.95, d.size - 1, loc=d.mean(), scale=sps.sem(d))
    assert close["diff_vs_ref"] == pytest.approx(d.mean())
    assert (close["diff_vs_ref_ci_low"], close["diff_vs_ref_ci_high"]) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    diff_best = np.array(VALUES["close"]) - np.array(VALUES["good"])
    assert close["diff_vs_best"] == pytest.approx(diff_best.mean())


def test_mcb_p_value_is_bonferroni_over_one_sided_comparisons_with_every_other() -> None:
    summary = summarise(runs_of(VALUES), {"test": "welch", **QUICK})
    one_sided = [
        sps.ttest_ind(VALUES["close"], VALUES[j], equal_var=False, alternative="less").pvalue
        for j in ("good", "bad")
    ]
    p_close = min(1.0, 2 * min(one_sided))
    assert _row(summary, "close")["p_not_best"] == pytest.approx(p_close)
    # Holm over the three inits of the cell.
    raw = summary.set_index("init")["p_not_best"]
    holm = multipletests(raw.to_numpy(), method="holm")[1]
    np.testing.assert_allclose(summary.set_index("init")["p_not_best_adj"], holm)
    assert dict(zip(summary["init"], summary["mark"], strict=True)) == {
        "good": "best",
        "close": "not_separated",
        "bad": "worse",
    }


def test_six_equal_inits_rarely_get_a_worse_mark() -> None:
    """Testing against the estimated best marks ~34 % of such cells; MCB holds alpha."""
    rng = np.random.default_rng(11)
    cells_with_worse = 0
    reps = 60
    for _ in range(reps):
        values = {f"i{k}": list(rng.normal(0.8, 0.02, 10)) for k in range(6)}
        summary = summarise(runs_of(values), {"test": "welch", **QUICK})
        cells_with_worse += bool((summary["mark"] == "worse").any())
    assert cells_with_worse / reps <= 0.1


def _nested_runs(rng: np.random.Generator, effect: float = 0.0) -> pd.DataFrame:
    """Two pre-trained inits, 3 pre-training runs x 6 fine-tune seeds; big pre-training noise."""
    rows = []
    for init, shift in (("a", 0.0), ("b", effect)):
        for p in range(3):
            pretrain = rng.normal(0, 0.03)
            for seed in range(6):
                value = 0.8 + shift + pretrain + rng.normal(0, 0.01)
                rows.append(
                    {"task": "t", "metric": "auc", "fraction": 0.1, "init": init}
                    | {"seed": seed, "pretrain_seed": p, "value": value, "flags": ""}
                )
    return pd.DataFrame(rows)


def test_nested_analysis_holds_alpha_where_pooling_the_seeds_does_not() -> None:
    rng = np.random.default_rng(5)
    nested_hits = pooled_hits = 0
    reps = 80
    for _ in range(reps):
        runs = _nested_runs(rng)
        summary = summarise(runs, {"reference": "a", **QUICK})
        b = _row(summary, "b")
        assert b["unit"] == "pretrain_run" and b["n_units"] == 3 and b["n_pretrain"] == 3
        nested_hits += b["p_vs_ref"] < 0.05
        pooled = runs.groupby("init")["value"].apply(list)
        pooled_hits += sps.ttest_ind(pooled["a"], pooled["b"], equal_var=False).pvalue < 0.05
    assert nested_hits / reps <= 0.12
    assert pooled_hits / reps >= 0.4


def test_nested_summary_is_over_pretraining_run_means() -> None:
    runs = _nested_runs(np.random.default_rng(0))
    summary = summarise(runs, QUICK)
    means = runs[runs["init"] == "a"].groupby("pretrain_seed")["value"].mean()
    a = _row(summary, "a")
    assert a["mean"] == pytest.approx(means.mean()) and a["std"] == pytest.approx(means.std())
    assert a["n"] == 18 and a["n_seeds"] == 6
    assert summary["notes"].str.contains("Welch's test on pre-training-run means").any()


def test_one_pretraining_run_is_noted() -> None:
    runs = runs_of(VALUES)
    runs["pretrain_seed"] = [0 if i != "bad" else None for i in runs["init"]]
    summary = summarise(runs, QUICK)
    assert "pre-training variance not measured" in _row(summary, "good")["notes"]
    assert "pre-training" not in _row(summary, "bad")["notes"]


def test_tost_claims_equivalence_only_inside_the_margin() -> None:
    rng = np.random.default_rng(2)
    claimed = {0.0: 0, 0.03: 0}
    reps = 40
    for _ in range(reps):
        for true_diff in claimed:
            base = rng.normal(0.8, 0.01, 10)
            values = {"a": list(base + rng.normal(0, 0.005, 10))}
            values["b"] = list(base - true_diff + rng.normal(0, 0.005, 10))
            summary = summarise(runs_of(values), {"equivalence_margin": 0.02, **QUICK})
            # The claim sits on whichever of the two is not the best.
            claimed[true_diff] += (summary["equivalence"] == "equivalent within ±0.02").any()
    assert claimed[0.0] / reps >= 0.9  # inside the margin: found
    assert claimed[0.03] / reps <= 0.05  # outside: (almost) never claimed
    plain = summarise(runs_of(VALUES), QUICK)
    assert plain["p_equiv"].isna().all() and (plain["equivalence"] == "").all()


def test_probability_of_being_best_is_a_bootstrap_over_seeds() -> None:
    summary = summarise(runs_of(VALUES), {"best_bootstrap": 400})
    p = dict(zip(summary["init"], summary["p_best"], strict=True))
    assert sum(p.values()) == pytest.approx(1.0)
    assert p["bad"] == 0.0 and p["good"] > p["close"] > 0
    pd.testing.assert_frame_equal(summary, summarise(runs_of(VALUES), {"best_bootstrap": 400}))


def test_correction_family_widens_over_the_task() -> None:
    runs = pd.concat([runs_of(VALUES, fraction=f) for f in (0.1, 0.5)])
    cell = summarise(runs, {"reference": "bad", **QUICK})
    task = summarise(runs, {"reference": "bad", "correction_family": "task", **QUICK})
    raw = task["p_vs_ref"].to_numpy()
    np.testing.assert_allclose(
        task["p_vs_ref_adj"].dropna(), multipletests(raw[np.isfinite(raw)], method="holm")[1]
    )
    assert (task["p_vs_ref_adj"].dropna() >= cell["p_vs_ref_adj"].dropna() - 1e-15).all()
    assert set(task["family"]) == {"task"} and set(cell["family"]) == {"cell"}


def test_powerless_and_degenerate_cells_are_noted(caplog) -> None:
    values = {"a": [0.8, 0.81, 0.79, 0.8], "b": [0.7, 0.7, 0.7, 0.7], "c": [0.6, 0.62]}
    runs = runs_of(values)
    runs["flags"] = ["constant_prediction" if i == "b" else "" for i in runs["init"]]
    summary = summarise(runs, {"test": "wilcoxon", "reference": "a", **QUICK})
    b, c = _row(summary, "b"), _row(summary, "c")
    assert "all runs identical" in b["notes"]
    assert "4 of 4 runs flagged constant_prediction" in b["notes"]
    assert "Wilcoxon with 4 pairs cannot reach p < 0.05 (smallest possible p = 0.125)" in b["notes"]
    assert (
        "only 2 unit(s) (seed): intervals and tests are weak (two-sided 95% critical t = 12.7)"
        in (c["notes"])
    )
    assert "all runs identical" in caplog.text and "cannot reach" in caplog.text


def test_zero_variance_comparison_is_noted_not_silent() -> None:
    values = {"a": [0.8, 0.8, 0.8], "b": [0.7, 0.7, 0.7]}
    summary = summarise(runs_of(values), {"reference": "a", **QUICK})
    b = _row(summary, "b")
    assert math.isnan(b["p_vs_ref"]) and b["stars"] == ""
    assert "zero variance: no test possible" in b["notes"]
    assert b["mark"] == "not_separated"


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
    summary = summarise(runs, QUICK)
    assert set(summary["best_init"]) == {"x"}
    assert _row(summary, "y")["mark"] == "worse"


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
    summary = summarise(runs, {"test": test, "reference": "bad", "correction": "none", **QUICK})
    for init in ("good", "close"):
        row = _row(summary, init)
        assert row["reference"] == "bad"
        assert row["p_vs_ref"] == pytest.approx(scipy_p(VALUES[init], VALUES["bad"]), rel=1e-10)
    ref = _row(summary, "bad")
    assert math.isnan(ref["p_vs_ref"]) and ref["stars"] == ""


def test_two_sample_p_gives_nan_for_constant_groups() -> None:
    assert math.isnan(two_sample_p([1.0, 1.0], [2.0, 2.0], "welch"))
    with pytest.raises(TypeError, match="Series indexed by seed"):
        two_sample_p([1.0, 2.0], [1.5, 2.5], "paired")


def test_bootstrap_ci_matches_scipy_and_is_reproducible() -> None:
    settings = {"bootstrap": 500, "bootstrap_seed": 7, "confidence": 0.9, **QUICK}
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


def test_from_published_matches_ttest_ind_from_stats() -> None:
    table = pd.DataFrame(
        {"task": "t", "metric": "auc", "init": ["a", "b"], "mean": [0.9, 0.85]}
        | {"std": [0.01, 0.02], "n": [10, 10]}
    )
    out = summary_from_published(table, {"test": "welch"}, std_ddof=0)
    k = math.sqrt(10 / 9)
    less = sps.ttest_ind_from_stats(
        0.85, 0.02 * k, 10, 0.9, 0.01 * k, 10, equal_var=False, alternative="less"
    ).pvalue
    b = out[out["init"] == "b"].iloc[0]
    assert b["p_not_best"] == pytest.approx(less, rel=1e-10)
    assert b["std"] == pytest.approx(0.02 * k)
    assert b["diff_vs_best"] == pytest.approx(-0.05)


def test_published_table_falls_back_from_paired_with_a_note() -> None:
    table = pd.DataFrame(
        {"task": "t", "metric": "auc", "init": ["a", "b"], "mean": [0.9, 0.8]}
        | {"std": [0.01, 0.02], "n": [10, 10]}
    )
    out = summary_from_published(table)
    assert out["notes"].str.contains("Welch's test from mean, std, n").all()


def test_rounding_flip_is_flagged_where_the_last_digit_decides() -> None:
    # b is 0.03 below a with stds of 0.02 over 10 runs (MCB p ~ 0.007); moved by half
    # a unit of the last published digit (0.005) towards each other, it is not (p ~ 0.09).
    table = pd.DataFrame(
        {"task": "t", "metric": "auc", "init": ["a", "b", "c"], "mean": [0.93, 0.9, 0.5]}
        | {"std": [0.02, 0.02, 0.02], "n": [10, 10, 10]}
    )
    out = summary_from_published(table, {"test": "welch"}, decimals=2).set_index("init")
    assert out.loc["b", "flips_within_rounding"]
    assert not out.loc["c", "flips_within_rounding"]
    assert (out.loc["b", "mark_if_favoured"], out.loc["b", "mark_if_disfavoured"]) == (
        "not_separated",
        "worse",
    )
    fine = summary_from_published(table, {"test": "welch"}, decimals=4).set_index("init")
    assert not fine["flips_within_rounding"].any()


def published_table(path: Path) -> pd.DataFrame:
    """Study B's table; missing, the test fails under CI (env var CI set) and skips elsewhere."""
    if not path.is_file():
        message = f"study B's published table not found at {path} (../shared/data)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return pd.read_csv(path)


def test_a_missing_published_table_fails_under_ci(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not found"):
        published_table(tmp_path / "absent.csv")


def test_taher2021_published_table_all_five_tasks() -> None:
    table = published_table(PUBLISHED)
    out = summary_from_published(table, {"test": "welch"}, std_ddof=0, decimals=2)
    assert set(out["task"]) == STUDY_B_TASKS
    assert (out.groupby("task")["mark"].apply(lambda m: (m == "best").sum()) == 1).all()
    assert set(out["mark"]) <= {"best", "not_separated", "worse"}
    best = out[out["mark"] == "best"].set_index("task")["init"].to_dict()
    expected = table.loc[table.groupby("task")["mean"].idxmax()].set_index("task")["init"]
    assert best == expected.to_dict()
    txc = out[out["task"] == "TXC"].set_index("init")
    assert txc.loc["ImageNet->ChestX-ray14", "mean"] == pytest.approx(98.47)
    assert txc.loc["Scratch", "mark"] == "worse" and txc.loc["Scratch", "p_not_best"] < 1e-6
    # Every Scratch is worse than the best in every task, robustly to rounding.
    scratch = out[out["init"] == "Scratch"]
    assert (scratch["mark"] == "worse").all() and not scratch["flips_within_rounding"].any()
    assert out["flips_within_rounding"].dtype == bool


def test_bad_settings_fail_loudly_and_are_named() -> None:
    with pytest.raises(ValueError, match="correction"):
        summarise(runs_of(VALUES), {"correction": "bonferroni-ish"})
    with pytest.raises(ValueError, match="stats.bootstrap"):
        summarise(runs_of(VALUES), {"bootstrap": -1})
    with pytest.raises(ValueError, match="stats.test"):
        summarise(runs_of(VALUES), {"test": "anova"})
    with pytest.raises(ValueError, match="stats.equivalence_margin"):
        summarise(runs_of(VALUES), {"equivalence_margin": -0.1})
    with pytest.raises(UnknownNameError, match="stats.correction_family 'column'"):
        summarise(runs_of(VALUES), {"correction_family": "column"})
    with pytest.raises(ValueError, match="stats.logit_eps"):
        summarise(runs_of(VALUES), {"logit_eps": 0.7})


def test_schema_defaults_of_the_stats_section_agree_with_the_code() -> None:
    """Every key the schema's ``stats`` section defaults, the code defaults to the same value.

    ``test`` is the exception while the schema still says ``welch``: the code's
    default is ``paired`` (the design pairs runs by seed).
    """
    section = yaml.safe_load(SCHEMA.read_text())["properties"]["stats"]["properties"]
    schema_defaults = {key: spec["default"] for key, spec in section.items() if "default" in spec}
    for key, value in schema_defaults.items():
        if key == "test" and value == "welch":
            continue
        assert DEFAULT_SETTINGS[key] == value, key


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
