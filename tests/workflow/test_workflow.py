"""The whole Snakemake workflow on the tiny config, as a user runs it.

The session's one run (``workflow_run``, tests/workflow/conftest.py); the tests
check the files produced and what a rerun would do, by dry runs, which is how
Snakemake itself decides what to rerun.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.workflow.tree import TINY, base_config, planned_jobs, snakemake

pytestmark = pytest.mark.workflow


def tiny_grid() -> dict:
    config = base_config()
    tiny = yaml.safe_load(TINY.read_text())
    return {
        "inits": sorted(config["inits"]),
        "tasks": sorted(config["tasks"]),
        "fractions": tiny["fractions"],
        "seeds": tiny["seeds"],
    }


def test_workflow_produces_tables_and_figures(workflow_run: Path) -> None:
    grid = tiny_grid()
    runs = pd.read_csv(workflow_run / "results/tables/runs.csv")
    n_runs = len(grid["inits"]) * len(grid["tasks"]) * len(grid["fractions"]) * len(grid["seeds"])
    assert runs.groupby(["init", "task", "fraction", "seed"]).ngroups == n_runs
    assert set(runs["metric"]) >= {"auc", "accuracy", "f1"}
    summary = pd.read_csv(workflow_run / "results/tables/summary.csv")
    assert set(summary["mark"]) <= {"best", "not_separated", "worse"}
    assert (summary["n"] == len(grid["seeds"])).all()
    markdown = (workflow_run / "results/tables/summary.md").read_text()
    assert "**" in markdown
    for task in grid["tasks"]:
        assert task in markdown
        for suffix in ("png", "pdf"):
            for name in (f"label_efficiency_{task}", f"bars_{task}"):
                assert (workflow_run / f"results/figures/{name}.{suffix}").stat().st_size > 1000
        assert "booktabs" in (workflow_run / f"results/tables/summary_{task}.tex").read_text()
        assert len(pd.read_csv(workflow_run / f"results/tables/summary_{task}.csv")) > 0
    for name in ("forest", *(f"heatmap_frac{f:g}" for f in grid["fractions"])):
        assert (workflow_run / f"results/figures/{name}.pdf").stat().st_size > 1000
    efficiency = pd.read_csv(workflow_run / "results/tables/label_efficiency.csv")
    assert set(efficiency["init"]) == set(grid["inits"])
    assert efficiency["slope"].notna().all()
    assert (efficiency["cov_type"] == "cluster").all()
    rejects = pd.read_csv(workflow_run / "results/data/synthct.rejects.csv")
    assert len(rejects) == 10  # one scout image per patient, rejected with its reason
    assert rejects["reason"].str.contains("LOCALIZER", case=False).all()
    for init in grid["inits"]:
        assert (workflow_run / f"logs/finetune/{init}").is_dir()
    tiny = yaml.safe_load(TINY.read_text())
    for seed in tiny["pretrain"]["seeds"]:
        assert (workflow_run / f"benchmarks/pretrain/simclr/pseed{seed}.tsv").is_file()
    costs = pd.read_csv(workflow_run / "results/tables/costs.csv")
    assert set(costs["init"]) == set(grid["inits"])
    assert (costs.loc[costs["init"] == "simclr", "init_s"] > 0).all()


def test_second_run_does_nothing(workflow_run: Path) -> None:
    result = snakemake(workflow_run, "--dry-run")
    assert planned_jobs(result) == {}
    assert "Nothing to be done" in result.stdout + result.stderr


def test_finetune_setting_reruns_finetunes_and_what_follows(workflow_run: Path) -> None:
    changed = workflow_run / "changed.yaml"
    changed.write_text(yaml.safe_dump({"finetune": {"lr": 0.0005}}))
    result = snakemake(workflow_run, "--dry-run", configfiles=("tiny.yaml", "changed.yaml"))
    jobs = planned_jobs(result)
    grid = tiny_grid()
    # The tiny config runs both seeds of a cell in one job (compute.seeds_per_job: 2).
    cells = len(grid["inits"]) * len(grid["tasks"]) * len(grid["fractions"])
    assert jobs.pop("finetune") == cells
    assert jobs.pop("plots") == len(grid["tasks"])
    assert jobs.pop("bars") == jobs.pop("task_tables") == len(grid["tasks"])
    assert jobs.pop("heatmap") == len(grid["fractions"])
    assert jobs == {
        "aggregate": 1,
        "stats": 1,
        "tables": 1,
        "efficiency": 1,
        "forest": 1,
        "costs": 1,
        "all": 1,
    }


def test_seeds_per_job_runs_blocks_of_seeds(workflow_run: Path) -> None:
    """The tiny config ran both seeds in one job per cell; one seed per job is a new job each."""
    grid = tiny_grid()
    cells = len(grid["inits"]) * len(grid["tasks"]) * len(grid["fractions"])
    blocks = sorted((workflow_run / "results/finetune").rglob("metrics.json"))
    assert len(blocks) == cells and {path.parent.name for path in blocks} == {"seeds0_1"}
    runs = json.loads(blocks[0].read_text())
    assert [run["seed"] for run in runs] == grid["seeds"]
    single = workflow_run / "single.yaml"
    single.write_text(yaml.safe_dump({"compute": {"seeds_per_job": 1}}))
    result = snakemake(
        workflow_run, "--dry-run", "--printshellcmds", configfiles=("tiny.yaml", "single.yaml")
    )
    assert planned_jobs(result)["finetune"] == cells * len(grid["seeds"])
    text = result.stdout + result.stderr
    assert "/seed1/metrics.json" in text
    assert "--seed 1 " in text


def test_report_contains_figures(workflow_run: Path) -> None:
    snakemake(workflow_run, "--report", "results/report.html")
    report = workflow_run / "results/report.html"
    assert report.stat().st_size > 10_000
    text = report.read_text(errors="replace")
    for name in ("label_efficiency", "bars_", "heatmap_frac", "forest", "summary_"):
        assert name in text


def test_partial_target_summarises_what_exists(workflow_run: Path) -> None:
    assert "partial" not in planned_jobs(snakemake(workflow_run, "--dry-run"))
    snakemake(workflow_run, "--nolock", "partial")
    partial = pd.read_csv(workflow_run / "results/partial/summary.csv")
    full = pd.read_csv(workflow_run / "results/tables/summary.csv")
    pd.testing.assert_frame_equal(partial, full)
    assert (workflow_run / "results/partial/summary.md").read_text().startswith("# Results")
    assert planned_jobs(snakemake(workflow_run, "--dry-run", "partial")) == {}
    # A run that is rewritten (as a sweep does) makes the partial target stale.
    metrics = sorted((workflow_run / "results/finetune").rglob("metrics.json"))[0]
    stat = metrics.stat()
    os.utime(metrics, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        jobs = planned_jobs(snakemake(workflow_run, "--dry-run", "partial"))
    finally:
        os.utime(metrics, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert jobs == {"partial_runs": 1, "partial_stats": 1, "partial": 1}


def test_tables_carry_provenance(workflow_run: Path) -> None:
    tables = workflow_run / "results/tables"
    written = [p for p in tables.iterdir() if p.suffix in {".csv", ".md", ".tex"}]
    assert len(written) >= 5
    for table in written:
        sidecar = table.with_name(table.name + ".provenance.json")
        assert sidecar.is_file(), f"{table.name} has no provenance sidecar"
        prov = json.loads(sidecar.read_text())
        assert {"medssl_version", "git_commit", "settings", "seed", "packages"} <= set(prov)
