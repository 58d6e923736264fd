"""Cost per initialisation from generated Snakemake benchmark files and run records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from medssl.analysis.costs import (
    cost_table,
    device_kind,
    find_benchmarks,
    markdown,
    read_benchmark_seconds,
    with_scores,
)

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def write_tsv(path: Path, *seconds: float, rss: float = 500.0) -> Path:
    """A Snakemake benchmark file with one row per repeat."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{s}\t0:00:{int(s):02d}\t{rss}\t1\t1\t1\t0\t0\t50\t{s}\n" for s in seconds)
    path.write_text(HEADER + rows)
    return path


def write_record(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def finetune_record(device: str) -> dict:
    return {"init": "x", "provenance": {"settings": {"device": device}}}


@pytest.fixture
def workflow(tmp_path: Path) -> Path:
    """simclr pre-trained on a GPU, its fine-tunes on a GPU; scratch fine-tuned on the CPU."""
    bench, results = tmp_path / "benchmarks", tmp_path / "results"
    for pseed in (0, 1):  # two pre-training runs, summed
        write_tsv(bench / "pretrain" / "simclr" / f"pseed{pseed}.tsv", 3600.0)
        encoder = results / "init" / "simclr" / f"pseed{pseed}" / "encoder.json"
        write_record(encoder, {"device": "cuda:0"})
    for task in ("nodule", "region"):
        for seed in (0, 1):
            write_tsv(bench / "finetune" / "simclr" / task / "frac0.1" / f"seed{seed}.tsv", 360.0)
            record = results / "finetune" / "simclr" / task / "frac0.1" / f"seed{seed}"
            write_record(record / "metrics.json", finetune_record("cuda:0"))
    write_tsv(bench / "finetune" / "scratch" / "nodule" / "frac0.1" / "seeds0_1.tsv", 30.0, 50.0)
    record = results / "finetune" / "scratch" / "nodule" / "frac0.1" / "seeds0_1"
    write_record(record / "metrics.json", [finetune_record("cpu"), finetune_record("cpu")])
    write_tsv(bench / "stats" / "stats.tsv", 5.0)  # a report rule: not a cost of an init
    return tmp_path


def row(table: pd.DataFrame, init: str, task: str) -> dict:
    return table[(table["init"] == init) & (table["task"] == task)].iloc[0].to_dict()


def test_costs_are_attributed_to_each_init_and_task(workflow: Path) -> None:
    table = cost_table(find_benchmarks([workflow / "benchmarks"]), workflow / "results")
    simclr = row(table, "simclr", "nodule")
    assert simclr["init_rule"] == "pretrain"
    assert simclr["init_s"] == 7200.0
    assert simclr["init_gpu_h"] == pytest.approx(2.0)
    assert simclr["finetune_jobs"] == 2
    assert simclr["finetune_s"] == 720.0
    assert simclr["finetune_s_per_job"] == 360.0
    assert simclr["finetune_gpu_h"] == pytest.approx(0.2)
    everything = row(table, "simclr", "all")
    assert everything["finetune_jobs"] == 4
    assert everything["finetune_gpu_h"] == pytest.approx(0.4)
    assert set(table["init"]) == {"simclr", "scratch"}  # stats.tsv is no init's


def test_cpu_runs_say_cpu_not_zero_gpu_hours(workflow: Path) -> None:
    table = cost_table(find_benchmarks([workflow]), workflow / "results")
    scratch = row(table, "scratch", "nodule")
    assert scratch["finetune_device"] == "CPU"
    assert math.isnan(scratch["finetune_gpu_h"])
    assert scratch["finetune_s"] == 40.0  # the mean of the file's two repeats
    assert scratch["init_rule"] is None or pd.isna(scratch["init_rule"])
    text = markdown(table)
    scratch_line = next(line for line in text.splitlines() if line.startswith("| scratch"))
    assert "CPU" in scratch_line
    assert "| 0 |" not in scratch_line and "0.000" not in scratch_line


def test_a_run_without_a_record_takes_the_default_device(tmp_path: Path) -> None:
    write_tsv(tmp_path / "benchmarks" / "pretrain" / "byol.tsv", 1800.0)
    found = find_benchmarks([tmp_path / "benchmarks"])
    assert row(cost_table(found, tmp_path / "results"), "byol", "all")["init_device"] == "unknown"
    gpu = row(cost_table(found, tmp_path / "results", "cuda"), "byol", "all")
    assert gpu["init_gpu_h"] == pytest.approx(0.5)


def test_scores_from_the_summary_sit_beside_the_costs(workflow: Path) -> None:
    summary = pd.DataFrame(
        {
            "task": ["nodule", "nodule", "nodule"],
            "metric": ["auc", "auc", "auc"],
            "fraction": [0.1, 1.0, 0.1],
            "init": ["simclr", "simclr", "scratch"],
            "mean": [0.81, 0.9, 0.7],
        }
    )
    costs = cost_table(find_benchmarks([workflow]), workflow / "results")
    table = with_scores(costs, summary)
    assert row(table, "simclr", "nodule")["auc@0.1"] == pytest.approx(0.81)
    assert row(table, "simclr", "nodule")["auc@1"] == pytest.approx(0.9)
    assert math.isnan(row(table, "simclr", "region")["auc@0.1"])
    assert "auc@0.1" in markdown(table)
    with pytest.raises(ValueError, match="lacks columns"):
        with_scores(costs, summary.drop(columns="mean"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("wall\tmax_rss\n3\t4\n", "no 's' column"),
        ("s\tmax_rss\n", "no rows"),
        ("s\tmax_rss\nabc\t4\n", "not seconds"),
        ("", "not a Snakemake benchmark TSV"),
    ],
)
def test_a_malformed_benchmark_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "benchmarks" / "pretrain" / "simclr.tsv"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        read_benchmark_seconds(path)
    assert str(path) in str(err.value)


def test_unexpected_paths_and_inputs_are_refused(tmp_path: Path) -> None:
    odd = write_tsv(tmp_path / "benchmarks" / "finetune" / "simclr" / "nodule.tsv", 1.0)
    with pytest.raises(ValueError, match="unexpected path"):
        find_benchmarks([odd])
    loose = write_tsv(tmp_path / "elsewhere" / "x.tsv", 1.0)
    with pytest.raises(ValueError, match="not below a 'benchmarks' folder"):
        find_benchmarks([loose])
    with pytest.raises(ValueError, match="no such file"):
        find_benchmarks([tmp_path / "missing"])
    write_tsv(tmp_path / "only" / "benchmarks" / "stats" / "stats.tsv", 1.0)
    with pytest.raises(ValueError, match="no pretrain"):
        cost_table(find_benchmarks([tmp_path / "only"]))


@pytest.mark.parametrize(
    "device, kind",
    [("cuda:0", "GPU"), ("cuda", "GPU"), ("cpu", "CPU"), ("auto", "unknown"), (None, "unknown")],
)
def test_device_kind(device: str | None, kind: str) -> None:
    assert device_kind(device) == kind
