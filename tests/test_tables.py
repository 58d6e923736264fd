"""Stage ``tables``: the Markdown, CSV and LaTeX files, their sidecars and refused commands."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from medssl.analysis.tables import markdown_table
from medssl.tables import main
from tests.analysis.frames import table_summary, table_summary_with_stars


def test_cli(tmp_path: Path) -> None:
    summary = tmp_path / "summary.csv"
    table_summary().to_csv(summary, index=False)
    out = tmp_path / "summary.md"
    argv = ["--summary", str(summary), "--metric-order", "auc,accuracy", "--out", str(out)]
    assert main([*argv, "--settings", '{"alpha": 0.05}']) == 0
    text = out.read_text()
    assert text == markdown_table(pd.read_csv(summary), {}, metric_order=["auc", "accuracy"])
    assert "**0.800 ± 0.020**" in text


def test_cli_writes_csv_and_latex(tmp_path: Path) -> None:
    summary = tmp_path / "summary.csv"
    table_summary_with_stars().to_csv(summary, index=False)
    args = ["--summary", str(summary), "--task", "region"]
    out_csv, out_tex = tmp_path / "region.csv", tmp_path / "region.tex"
    assert main([*args, "--csv", str(out_csv), "--latex", str(out_tex)]) == 0
    table = pd.read_csv(out_csv)
    assert table.loc[table["init"] == "scratch", "25%"].item() == "1.50 ± 0.25 (best)"
    assert r"\begin{tabular}{lr}" in out_tex.read_text()


def test_sidecars_record_the_options(tmp_path: Path) -> None:
    summary = tmp_path / "summary.csv"
    table_summary().to_csv(summary, index=False)
    out = tmp_path / "results.md"
    assert main(["--summary", str(summary), "--out", str(out), "--init-order", "simclr"]) == 0
    record = json.loads((tmp_path / "results.md.provenance.json").read_text())
    assert record["stage"] == "tables"
    assert record["settings"]["init_order"] == ["simclr"] and record["settings"]["settings"] == {}
    assert "verbose" not in record["settings"]


def test_a_command_that_writes_nothing_is_refused(tmp_path: Path, caplog) -> None:
    summary = tmp_path / "summary.csv"
    table_summary().to_csv(summary, index=False)
    assert main(["--summary", str(summary)]) == 1
    assert "error: tables: give at least one of --out, --csv, --latex" in caplog.text
    assert main(["--summary", str(summary), "--csv", str(tmp_path / "t.csv")]) == 1
    assert "error: tables: --csv and --latex need --task" in caplog.text
    assert not (tmp_path / "t.csv").exists()
