"""Stage ``stats``: summary.csv, byte-identical on a rerun, with its provenance sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

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


PUBLISHED_TEXT = """task,metric,init,mean,std,n
T,AUC (%),a,93.00,2.00,10
T,AUC (%),b,90.00,2.00,10
T,AUC (%),c,50.00,2.00,10
"""


def test_published_table_from_the_command_line(tmp_path: Path) -> None:
    table = tmp_path / "published.csv"
    table.write_text(PUBLISHED_TEXT)
    out = tmp_path / "marks.csv"
    argv = ["--published", str(table), "--std-ddof", "0", "--out", str(out)]
    assert main([*argv, "--settings", '{"test": "welch"}']) == 0
    marks = pd.read_csv(out).set_index("init")
    assert marks.loc["a", "mark"] == "best" and marks.loc["c", "mark"] == "worse"
    assert marks["flips_within_rounding"].dtype == bool
    assert not marks.loc["c", "flips_within_rounding"]
    record = json.loads((tmp_path / "marks.csv.provenance.json").read_text())
    assert record["std_ddof"] == 0 and record["decimals"] == 2
    # One digit: b's mark is decided by the rounding.
    coarse = tmp_path / "coarse.csv"
    coarse.write_text(PUBLISHED_TEXT.replace(".00,2.00", ".0,2.0"))
    assert main(["--published", str(coarse), "--decimals", "0", "--out", str(out)]) == 0
    assert pd.read_csv(out).set_index("init").loc["b", "flips_within_rounding"]


def test_published_table_with_a_bad_column_is_one_error_line(tmp_path: Path, caplog) -> None:
    table = tmp_path / "published.csv"
    table.write_text(PUBLISHED_TEXT.replace("93.00", "n/a"))
    out = tmp_path / "marks.csv"
    assert main(["--published", str(table), "--out", str(out)]) == 1
    assert "column 'mean' holds non-numbers ['n/a']" in caplog.text
    with pytest.raises(SystemExit):  # argparse: --runs and --published exclude each other
        main(["--published", str(table), "--runs", str(table), "--out", str(out)])
    assert not out.exists()


def test_predictions_root_adds_test_set_intervals(tmp_path: Path) -> None:
    import numpy as np

    from tests.analysis.metrics_files import payload, write_metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 30)
    rows = []
    for init in ("a", "b"):
        for seed in range(3):
            scores = labels + rng.normal(0, 1.0, 30)
            path = write_metrics(tmp_path / "finetune", payload(init, "t", 0.5, seed, auc=0.8))
            np.savez(
                path.parent / "test_predictions.npz",
                sample_index=np.arange(60),
                patient_id=np.repeat(np.arange(30).astype(str), 2),
                labels=np.repeat(labels, 2),
                scores=np.repeat(scores, 2),
            )
            rows.append({"init": init, "seed": seed, "value": 0.8 + 0.01 * seed})
    runs = pd.DataFrame(rows).assign(task="t", task_type="binary", fraction=0.5, metric="auc")
    runs_csv = tmp_path / "runs.csv"
    runs.to_csv(runs_csv, index=False)
    out = tmp_path / "summary.csv"
    argv = ["--runs", str(runs_csv), "--out", str(out), "--settings", '{"test_bootstrap": 200}']
    assert main([*argv, "--predictions-root", str(tmp_path / "finetune")]) == 0
    summary = pd.read_csv(out)
    assert (summary["test_se"] > 0).all()
    assert (
        summary["ci_total_high"] - summary["ci_total_low"] > summary["ci_high"] - summary["ci_low"]
    ).all()
    assert summary["notes"].str.contains("test-set variance").all()
