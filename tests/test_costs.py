"""``python -m medssl.costs``: the cost table, its sidecar and Markdown, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from medssl.costs import main
from tests.analysis.test_costs import finetune_record, write_record, write_tsv


def make_run(root: Path) -> None:
    """One GPU pre-training and one GPU fine-tune of simclr."""
    write_tsv(root / "benchmarks" / "pretrain" / "simclr.tsv", 3600.0)
    write_record(root / "results" / "init" / "simclr" / "encoder.json", {"device": "cuda"})
    write_tsv(root / "benchmarks" / "finetune" / "simclr" / "nodule" / "frac1.0" / "seed0.tsv", 90)
    metrics = root / "results" / "finetune" / "simclr" / "nodule" / "frac1.0" / "seed0"
    write_record(metrics / "metrics.json", finetune_record("cuda:0"))


def test_the_stage_writes_csv_sidecar_and_markdown(tmp_path: Path) -> None:
    make_run(tmp_path)
    summary = tmp_path / "summary.csv"
    pd.DataFrame(
        {
            "task": ["nodule"],
            "metric": ["auc"],
            "fraction": [1.0],
            "init": ["simclr"],
            "mean": [0.9],
        }
    ).to_csv(summary, index=False)
    out, md = tmp_path / "costs.csv", tmp_path / "costs.md"
    status = main(
        ["--benchmarks", str(tmp_path / "benchmarks"), "--results", str(tmp_path / "results"),
         "--summary", str(summary), "--out", str(out), "--markdown", str(md)]
    )  # fmt: skip
    assert status == 0
    table = pd.read_csv(out)
    nodule = table[table["task"] == "nodule"].iloc[0]
    assert nodule["init_gpu_h"] == 1.0
    assert nodule["finetune_s"] == 90.0
    assert nodule["auc@1"] == 0.9
    sidecar = json.loads((tmp_path / "costs.csv.provenance.json").read_text())
    assert sidecar["stage"] == "costs"
    assert sidecar["settings"]["summary"] == str(summary)
    assert (tmp_path / "costs.md.provenance.json").exists()
    text = md.read_text()
    assert "## nodule" in text and "| simclr | pretrain | 3600.0 | 1 |" in text


def test_a_malformed_file_fails_with_its_name(tmp_path: Path, caplog) -> None:
    make_run(tmp_path)
    bad = tmp_path / "benchmarks" / "pretrain" / "byol.tsv"
    bad.write_text("seconds\n12\n")
    status = main(["--benchmarks", str(tmp_path), "--out", str(tmp_path / "costs.csv")])
    assert status == 1
    err = caplog.text
    assert f"error: costs: {bad}: no 's' column" in err
    assert not (tmp_path / "costs.csv").exists()
