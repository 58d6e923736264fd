"""Stage ``stats``: summary.csv, byte-identical on a rerun, with its provenance sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from medssl.analysis.statistics import SUMMARY_COLUMNS
from medssl.stats import main
from tests.analysis.frames import VALUES, runs_of


def test_cli_writes_summary(tmp_path: Path) -> None:
    runs = tmp_path / "runs.csv"
    runs_of(VALUES).to_csv(runs, index=False)
    out = tmp_path / "tables" / "summary.csv"
    assert main(["--runs", str(runs), "--settings", '{"alpha": 0.05}', "--out", str(out)]) == 0
    first = out.read_bytes()
    assert main(["--runs", str(runs), "--settings", '{"alpha": 0.05}', "--out", str(out)]) == 0
    assert out.read_bytes() == first
    assert list(pd.read_csv(out).columns) == list(SUMMARY_COLUMNS)


def test_sidecar_records_the_resolved_settings(tmp_path: Path) -> None:
    runs = tmp_path / "runs.csv"
    runs_of(VALUES).to_csv(runs, index=False)
    out = tmp_path / "summary.csv"
    assert main(["--runs", str(runs), "--settings", '{"test": "student"}', "--out", str(out)]) == 0
    record = json.loads((tmp_path / "summary.csv.provenance.json").read_text())
    assert record["stage"] == "stats"
    assert record["settings"]["test"] == "student" and record["settings"]["alpha"] == 0.05


def test_bad_settings_are_one_error_line(tmp_path: Path, caplog) -> None:
    runs = tmp_path / "runs.csv"
    runs_of(VALUES).to_csv(runs, index=False)
    out = tmp_path / "summary.csv"
    assert main(["--runs", str(runs), "--settings", '{"test": "welsh"}', "--out", str(out)]) == 1
    assert "error: stats: unknown stats.test 'welsh'; did you mean 'welch'?" in caplog.text
    assert not out.exists()
