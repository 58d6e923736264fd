"""Markdown tables: bold best, dagger on equivalents, formatting and legend."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medssl.analysis.tables import decimals_for, fraction_label, main, markdown_table


def _summary() -> pd.DataFrame:
    rows = [
        # task, metric, fraction, init, n, mean, std, mark
        ("nodule", "auc", 0.1, "scratch", 5, 0.61234, 0.0456, "worse"),
        ("nodule", "auc", 0.1, "simclr", 5, 0.80001, 0.02, "best"),
        ("nodule", "auc", 0.1, "byol", 4, 0.7912, 0.031, "equivalent"),
        ("nodule", "auc", 0.5, "scratch", 5, 0.7, 0.01, "worse"),
        ("nodule", "auc", 0.5, "simclr", 5, 0.85, 0.01, "best"),
        ("nodule", "accuracy", 0.1, "simclr", 5, 0.7, 0.05, "best"),
        ("nodule", "accuracy", 0.1, "scratch", 5, 0.69, 0.05, "equivalent"),
        ("region", "loss", 0.25, "scratch", 3, 1.5, 0.25, "best"),
        ("region", "loss", 0.25, "simclr", 1, 2.5, float("nan"), "equivalent"),
    ]
    frame = pd.DataFrame(
        rows, columns=["task", "metric", "fraction", "init", "n", "mean", "std", "mark"]
    )
    frame["sem"] = frame["ci_low"] = frame["ci_high"] = frame["median"] = float("nan")
    frame["best_init"] = frame["p_vs_best"] = frame["p_vs_best_adj"] = float("nan")
    return frame


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_bold_best_and_dagger_on_equivalents() -> None:
    text = markdown_table(_summary(), {}, metric_order=["auc", "accuracy"])
    assert "| simclr | **0.800 ± 0.020** | **0.850 ± 0.010** |" in text
    byol = _line(text, "| byol |")
    assert "0.791 ± 0.031 † (n=4)" in byol
    assert byol.endswith("| – |")  # byol has no run at 50 %
    scratch = _line(text, "| scratch |")
    assert "0.612 ± 0.046 |" in scratch and "**" not in scratch and "†" not in scratch


def test_layout_sections_and_columns() -> None:
    text = markdown_table(_summary(), {}, metric_order=["auc", "accuracy"])
    assert "## nodule" in text and "## region" in text
    assert text.index("### AUC") < text.index("### Accuracy")  # metric order honoured
    assert "| Initialisation | 10% | 50% |" in text
    assert "|:---|---:|---:|" in text
    # rows sorted by init name unless an order is given
    ordered = markdown_table(_summary(), {}, init_order=["scratch"])
    auc = ordered[ordered.index("### AUC") :]
    assert auc.index("| scratch |") < auc.index("| byol |") < auc.index("| simclr |")


def test_decimals_consistent_per_table() -> None:
    text = markdown_table(_summary(), {})
    region = text[text.index("## region") :]
    assert "**1.50 ± 0.25**" in region
    assert "2.50 † (n=1)" in region  # std undefined for n=1: mean only
    assert decimals_for([0.1, 0.9]) == 3
    assert decimals_for([0.1, 12.0]) == 2
    assert fraction_label(0.1) == "10%"
    assert fraction_label(0.025) == "2.5%"
    assert fraction_label(1.0) == "100%"


def test_legend_states_test_correction_and_alpha() -> None:
    text = markdown_table(_summary(), {"test": "welch", "correction": "holm", "alpha": 0.01})
    assert "Welch's unequal-variance t-test" in text
    assert "Holm-corrected within each column" in text
    assert "α = 0.01" in text
    assert "**Bold**: highest mean" in text
    assert "**Bold**: lowest mean" in text  # the loss table
    other = markdown_table(_summary(), {"test": "student", "correction": "fdr_bh"})
    assert "Student's" in other and "Benjamini-Hochberg" in other and "α = 0.05" in other


def test_cli(tmp_path: Path) -> None:
    summary = tmp_path / "summary.csv"
    _summary().to_csv(summary, index=False)
    out = tmp_path / "summary.md"
    argv = ["--summary", str(summary), "--metric-order", "auc,accuracy", "--out", str(out)]
    assert main([*argv, "--settings", '{"alpha": 0.05}']) == 0
    text = out.read_text()
    assert text == markdown_table(pd.read_csv(summary), {}, metric_order=["auc", "accuracy"])
    assert "**0.800 ± 0.020**" in text


def _with_stars() -> pd.DataFrame:
    frame = _summary()
    frame["stars"] = ""
    frame.loc[(frame["init"] == "simclr") & (frame["fraction"] == 0.1), "stars"] = "**"
    frame.loc[(frame["init"] == "byol"), "stars"] = "n.s."
    return frame


def test_csv_table_matches_markdown_numbers_and_marks() -> None:
    from medssl.analysis.tables import task_csv

    table = task_csv(_with_stars(), "nodule", init_order=["scratch", "simclr", "byol"])
    assert list(table.columns) == ["metric", "init", "10%", "50%"]
    auc = table[table["metric"] == "auc"].set_index("init")
    assert list(auc.index) == ["scratch", "simclr", "byol"]
    assert auc.loc["simclr", "10%"] == "0.800 ± 0.020 (best) **"
    assert auc.loc["byol", "10%"] == "0.791 ± 0.031 † (n=4)"
    assert auc.loc["scratch", "10%"] == "0.612 ± 0.046"
    assert auc.loc["byol", "50%"] == "–"


def test_latex_table_is_booktabs_with_bold_dagger_and_caption() -> None:
    from medssl.analysis.tables import task_latex

    text = task_latex(
        _with_stars().replace({"init": {"byol": "byol_v2"}}),
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


def test_cli_writes_csv_and_latex(tmp_path: Path) -> None:
    summary = tmp_path / "summary.csv"
    _with_stars().to_csv(summary, index=False)
    args = ["--summary", str(summary), "--task", "region"]
    out_csv, out_tex = tmp_path / "region.csv", tmp_path / "region.tex"
    assert main([*args, "--csv", str(out_csv), "--latex", str(out_tex)]) == 0
    table = pd.read_csv(out_csv)
    assert table.loc[table["init"] == "scratch", "25%"].item() == "1.50 ± 0.25 (best)"
    assert r"\begin{tabular}{lr}" in out_tex.read_text()
