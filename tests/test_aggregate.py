"""Stage ``aggregate``: byte-identical runs.csv whatever the input order, list files, failures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from medssl.aggregate import main
from medssl.analysis.runs import COLUMNS
from tests.analysis.metrics_files import payload, write_metrics, write_sweep


@pytest.fixture
def sweep(tmp_path: Path) -> list[Path]:
    return write_sweep(tmp_path / "finetune")


def test_cli_is_byte_identical_whatever_the_input_order(sweep: list[Path], tmp_path: Path) -> None:
    out1, out2 = tmp_path / "a" / "runs.csv", tmp_path / "b" / "runs.csv"
    assert main(["--out", str(out1), *map(str, sweep)]) == 0
    listfile = tmp_path / "list.txt"
    listfile.write_text("\n".join(map(str, reversed(sweep))) + "\n")
    assert main(["--out", str(out2), f"@{listfile}"]) == 0
    assert out1.read_bytes() == out2.read_bytes()
    text = out1.read_text().splitlines()
    assert text[0] == ",".join(COLUMNS)
    # Integers stay integers in the CSV; pretrain_seed and flags are empty when not recorded.
    assert text[1].split(",")[-4:] == ["40", "3", "", ""]
    assert (tmp_path / "a" / "runs.csv.provenance.json").is_file()


def test_partial_mode_globs_the_root(sweep: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "partial.csv"
    assert main(["--partial", "--root", str(tmp_path / "finetune"), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 16


def test_cli_reports_bad_file_and_writes_nothing(tmp_path: Path, caplog) -> None:
    good = write_metrics(tmp_path, payload("scratch", "nodule", 0.1, 0))
    bad = write_metrics(tmp_path, payload("simclr", "nodule", 0.1, 0, auc=-math.inf))
    out = tmp_path / "runs.csv"
    assert main(["--out", str(out), str(good), str(bad)]) == 1
    assert not out.exists()
    assert str(bad) in caplog.text


def test_an_undefined_metric_is_an_empty_cell(tmp_path: Path) -> None:
    path = write_metrics(tmp_path, payload("scratch", "nodule", 0.1, 0, auc=None, accuracy=0.5))
    out = tmp_path / "runs.csv"
    assert main(["--out", str(out), str(path)]) == 0
    assert pd.read_csv(out)["value"].isna().sum() == 1


def test_sidecar_counts_files_and_rows(sweep: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "runs.csv"
    assert main(["--out", str(out), *map(str, sweep)]) == 0
    record = json.loads((tmp_path / "runs.csv.provenance.json").read_text())
    assert record["stage"] == "aggregate" and (record["n_files"], record["n_rows"]) == (8, 16)
    assert record["settings"] == {"partial": False, "root": None}
    assert main(["--out", str(tmp_path / "bare.csv"), "--no-provenance", str(sweep[0])]) == 0
    assert not (tmp_path / "bare.csv.provenance.json").exists()


def test_no_files_and_no_partial_is_refused(tmp_path: Path, caplog) -> None:
    assert main(["--out", str(tmp_path / "runs.csv")]) == 1
    assert "error: aggregate: give metrics.json files (or @listfile), or --partial" in caplog.text
