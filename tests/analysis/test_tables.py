"""analysis.tables: bold best, ↓ for "shown not best", ≈ for TOST, legends, notes; CSV, LaTeX."""

from __future__ import annotations

from medssl.analysis.tables import (
    decimals_for,
    fraction_label,
    markdown_table,
    task_csv,
    task_latex,
)
from tests.analysis.frames import table_summary, table_summary_full, table_summary_with_stars


def _section(text: str, heading: str) -> str:
    """From ``heading`` to the next heading of any level."""
    start = text.index(heading)
    ends = [i for i in (text.find("\n#", start + 1),) if i > 0]
    return text[start : min(ends, default=len(text))]


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_bold_best_arrow_on_worse_and_no_mark_on_not_separated() -> None:
    text = markdown_table(table_summary(), {}, metric_order=["auc", "accuracy"])
    assert "| simclr | **0.800 ± 0.020** | **0.850 ± 0.010** |" in text
    byol = _line(text, "| byol |")
    assert "| 0.791 ± 0.031 (n=4) |" in byol  # not separated: deliberately unmarked
    assert byol.endswith("| – |")  # byol has no run at 50 %
    scratch = _line(text, "| scratch |")
    assert "0.612 ± 0.046 ↓ |" in scratch and "**" not in scratch
    assert "†" not in text


def test_equivalence_mark_only_where_tost_passed_and_differences_shown() -> None:
    text = markdown_table(table_summary_full(), {"equivalence_margin": 0.02})
    byol = _line(text, "| byol |")
    assert "0.791 ± 0.031 ≈ (n=4)" in byol
    assert "≈: equivalent to the best within ±0.02 (two one-sided tests" in text
    auc = text[text.index("### AUC") :]
    assert "Difference to the best, 95% CI" in auc
    assert "| scratch | -0.188 [-0.198, -0.178] | -0.150 [-0.160, -0.140] |" in auc
    no_margin = markdown_table(table_summary_full(), {})
    assert "No equivalence test was made" in no_margin


def test_legend_gives_the_design_and_flags_one_pretraining_run() -> None:
    text = markdown_table(table_summary_full(), {})
    auc = text[text.index("### AUC") : text.index("## region")]
    assert "scratch: 3 pre-training runs × 5 fine-tune seeds" in auc
    assert (
        "simclr: 1 pre-training run × 5 fine-tune seeds (pre-training variance not measured)" in auc
    )
    assert "not test-set sampling" in auc


def test_notes_of_weak_cells_are_listed_under_the_table() -> None:
    text = markdown_table(table_summary_full(), {})
    assert "- byol, 10%: only 2 unit(s) (seed): intervals and tests are weak" in text
    table = task_csv(table_summary_full(), "nodule")
    first = table[(table["quantity"] == "mean ± std") & (table["metric"] == "auc")]
    assert (
        first.set_index("init").loc["byol", "notes"]
        == "10%: only 2 unit(s) (seed): intervals and tests are weak"
    )


def test_layout_sections_and_columns() -> None:
    text = markdown_table(table_summary(), {}, metric_order=["auc", "accuracy"])
    assert "## nodule" in text and "## region" in text
    assert text.index("### AUC") < text.index("### Accuracy")  # metric order honoured
    assert "| Initialisation | 10% | 50% |" in text
    assert "|:---|---:|---:|" in text
    # rows sorted by init name unless an order is given
    ordered = markdown_table(table_summary(), {}, init_order=["scratch"])
    auc = ordered[ordered.index("### AUC") :]
    assert auc.index("| scratch |") < auc.index("| byol |") < auc.index("| simclr |")


def test_decimals_consistent_per_table() -> None:
    text = markdown_table(table_summary(), {})
    region = text[text.index("## region") :]
    assert "**1.50 ± 0.25**" in region
    assert "2.50 (n=1)" in region  # std undefined for n=1: mean only
    assert decimals_for([0.1, 0.9]) == 3
    assert decimals_for([0.1, 12.0]) == 2
    assert fraction_label(0.1) == "10%"
    assert fraction_label(0.025) == "2.5%"
    assert fraction_label(1.0) == "100%"


def test_legend_states_test_correction_and_alpha() -> None:
    text = markdown_table(table_summary(), {"test": "welch", "correction": "holm", "alpha": 0.01})
    assert "Welch's unequal-variance t-test" in text
    assert "family: within each column; Holm-corrected over the inits" in text
    wide = markdown_table(table_summary(), {"correction_family": "table"})
    assert "family: over every task, metric and fraction of the summary; Holm-corrected" in wide
    assert "Hsu's MCB" in text and "not evidence of equivalence" in text
    assert "α = 0.01" in text
    assert "**Bold**: highest mean" in text
    assert "**Bold**: lowest mean" in text  # the loss table
    other = markdown_table(
        table_summary(), {"test": "student", "correction": "fdr_bh", "correction_family": "task"}
    )
    assert "Student's" in other and "Benjamini-Hochberg" in other and "α = 0.05" in other


def test_csv_table_matches_markdown_numbers_and_marks() -> None:

    table = task_csv(table_summary_with_stars(), "nodule", init_order=["scratch", "simclr", "byol"])
    assert list(table.columns) == ["metric", "quantity", "init", "10%", "50%", "notes"]
    auc = table[table["metric"] == "auc"].set_index("init")
    assert list(auc.index) == ["scratch", "simclr", "byol"]
    assert auc.loc["simclr", "10%"] == "0.800 ± 0.020 (best) **"
    assert auc.loc["byol", "10%"] == "0.791 ± 0.031 (n=4)"
    assert auc.loc["scratch", "10%"] == "0.612 ± 0.046 ↓"
    assert auc.loc["byol", "50%"] == "–"


def test_latex_table_is_booktabs_with_bold_arrows_and_caption() -> None:

    text = task_latex(
        table_summary_with_stars().replace({"init": {"byol": "byol_v2"}}),
        "nodule",
        {"reference": "scratch", "test": "paired"},
    )
    assert text.count(r"\begin{table}") == 2
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert text.count(rule) == 2
    assert r"\textbf{0.800 $\pm$ 0.020}$^{**}$" in text
    assert r"0.791 $\pm$ 0.031 (n=4)" in text
    assert r"0.612 $\pm$ 0.046$^{\downarrow}$" in text
    assert r"byol\_v2 &" in text
    caption = _line(text, r"\caption{")
    assert "paired t-test" in caption and "Holm" in caption and r"\downarrow" in caption
    assert "different from scratch" in caption
    assert r"10\%" in text


def test_the_combined_seed_and_test_set_interval_is_its_own_table_in_every_format() -> None:
    frame = table_summary_full()
    frame["test_se"] = 0.01
    frame["ci_total_low"] = frame["mean"] - 0.04
    frame["ci_total_high"] = frame["mean"] + 0.04
    text = markdown_table(frame, {})
    auc = _section(text, "### AUC")
    assert "Mean with its interval over seeds and test patients, 95% CI" in auc
    assert "| simclr | 0.800 [0.760, 0.840] | 0.850 [0.810, 0.890] |" in auc
    assert "add test-set variance (patient-level bootstrap of the test split" in auc
    assert "not test-set sampling" not in auc
    latex = task_latex(frame, "nodule")
    assert "0.800 [0.760, 0.840]" in latex and "add test-set variance" in latex
    table = task_csv(frame, "nodule")
    assert "Mean with its interval over seeds and test patients" in set(table["quantity"])


def test_legend_names_cells_where_welch_replaced_the_paired_test() -> None:
    frame = table_summary_full()
    frame.loc[0, "notes"] = "Welch's test on pre-training-run means (not pairable by seed)"
    text = markdown_table(frame, {"test": "paired"})
    auc = _section(text, "### AUC")
    assert "In 1 of 5 cells some comparisons used Welch's unequal-variance t-test instead" in auc
    assert "In 1 of" in task_latex(frame, "nodule")
    assert "instead of the" not in markdown_table(table_summary_full(), {"test": "paired"})
