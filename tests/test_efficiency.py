"""Stage ``efficiency``: label_efficiency.csv with its sidecar; bad settings are one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from medssl.analysis.efficiency import COLUMNS
from medssl.efficiency import main
from tests.analysis.test_efficiency import simulate


def test_cli_writes_the_table_and_its_sidecar(tmp_path: Path) -> None:
    runs = tmp_path / "runs.csv"
    simulate({"scratch": 0.05, "spark": 0.02}).to_csv(runs, index=False)
    out = tmp_path / "label_efficiency.csv"
    settings = '{"reference": "scratch"}'
    assert main(["--runs", str(runs), "--settings", settings, "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns[: len(COLUMNS)]) == list(COLUMNS) and len(table) == 2
    record = json.loads((tmp_path / "label_efficiency.csv.provenance.json").read_text())
    assert record["stage"] == "efficiency" and record["settings"]["reference"] == "scratch"


def test_an_unknown_model_is_one_error_line(tmp_path: Path, caplog) -> None:
    runs = tmp_path / "runs.csv"
    simulate({"scratch": 0.05}).to_csv(runs, index=False)
    out = tmp_path / "label_efficiency.csv"
    settings = '{"efficiency_model": "mixed"}'
    assert main(["--runs", str(runs), "--settings", settings, "--out", str(out)]) == 1
    assert "error: efficiency: unknown stats.efficiency_model 'mixed'" in caplog.text
    assert not out.exists()
