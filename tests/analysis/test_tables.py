"""analysis.tables: bold best, dagger on equivalents, formatting, legends; CSV and LaTeX."""

from __future__ import annotations

from medssl.analysis.tables import (
    decimals_for,
    fraction_label,
    markdown_table,
    task_csv,
    task_latex,
)
from tests.analysis.frames import table_summary, table_summary_with_stars


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_bold_best_and_dagger_on_equivalents() -> None:
    text = markdown_table(table_summary(), {}, metric_order=["auc", "accuracy"])
    assert "| simclr | **0.800 ± 0.020** | **0.850 ± 0.010** |" in text
    byol = _line(text, "| byol |")
    assert "0.791 ± 0.031 † (n=4)" in byol
    assert byol.endswith("| – |")  # byol has no run at 50 %
    scratch = _line(text, "| scratch |")
    assert "0.612 ± 0.046 |" in scratch and "**" not in scratch and "†" not in scratch


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
    assert "2.50 † (n=1)" in region  # std undefined for n=1: mean only
    assert decimals_for([0.1, 0.9]) == 3
    assert decimals_for([0.1, 12.0]) == 2
    assert fraction_label(0.1) == "10%"
    assert fraction_label(0.025) == "2.5%"
    assert fraction_label(1.0) == "100%"


def test_legend_states_test_correction_and_alpha() -> None:
    text = markdown_table(table_summary(), {"test": "welch", "correction": "holm", "alpha": 0.01})
    assert "Welch's unequal-variance t-test" in text
    assert "Holm-corrected within each column" in text
    assert "α = 0.01" in text
    assert "**Bold**: highest mean" in text
    assert "**Bold**: lowest mean" in text  # the loss table
    other = markdown_table(table_summary(), {"test": "student", "correction": "fdr_bh"})
    assert "Student's" in other and "Benjamini-Hochberg" in other and "α = 0.05" in other


def test_csv_table_matches_markdown_numbers_and_marks() -> None:

    table = task_csv(table_summary_with_stars(), "nodule", init_order=["scratch", "simclr", "byol"])
    assert list(table.columns) == ["metric", "init", "10%", "50%"]
    auc = table[table["metric"] == "auc"].set_index("init")
    assert list(auc.index) == ["scratch", "simclr", "byol"]
    assert auc.loc["simclr", "10%"] == "0.800 ± 0.020 (best) **"
    assert auc.loc["byol", "10%"] == "0.791 ± 0.031 † (n=4)"
    assert auc.loc["scratch", "10%"] == "0.612 ± 0.046"
    assert auc.loc["byol", "50%"] == "–"


def test_latex_table_is_booktabs_with_bold_dagger_and_caption() -> None:

    text = task_latex(
        table_summary_with_stars().replace({"init": {"byol": "byol_v2"}}),
        "nodule",
        {"reference": "scratch", "test": "paired"},
    )
    assert text.count(r"\begin{table}") == 2
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert text.count(rule) == 2
    assert r"\textbf{0.800 $\pm$ 0.020}$^{**}$" in text
    assert r"0.791 $\pm$ 0.031\textsuperscript{\dag} (n=4)" in text
    assert r"byol\_v2 &" in text
    caption = _line(text, r"\caption{")
    assert "paired t-test" in caption and "Holm" in caption and r"\dag" in caption
    assert "different from scratch" in caption
    assert r"10\%" in text
