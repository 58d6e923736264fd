"""A killed snakemake, unlocked and rerun, gives what an uninterrupted run gives.

The killed run starts from a copy of the shared run's data, splits and
encoder (with Snakemake's records of them, so they are up to date) and
fine-tunes the smallest grid (one fraction, one seed, two tasks) up to
``runs.csv``: enough to kill fine-tuning half-way, and every run it ends with
is also a run of the shared uninterrupted run, whose results it must equal. Kills during
conversion and pre-training are tests/faults/test_kill.py's. The shared run
runs both seeds of a cell in one job, the killed run one seed per job, so the
comparison also shows that a run does not depend on the job it shares.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.workflow.tree import drop_task, planned_jobs, snakemake, snakemake_env

pytestmark = pytest.mark.workflow


FINAL = ("results/finetune", "results/tables", "results/figures", "results/partial")
"""What the killed run must make again: every fine-tune and what follows."""
GRID = {"fractions": [1.0], "seeds": [0]}
TARGET = "results/tables/runs.csv"
CONFIGS = ("tiny.yaml", "killed.yaml")


def copy_upstream_of_fine_tuning(workflow_run: Path, workdir: Path) -> None:
    """The shared run's folder without its fine-tunes and report (mtimes kept)."""
    skipped = {workflow_run / name for name in FINAL} | {workflow_run / "results/report.html"}
    shutil.copytree(
        workflow_run,
        workdir,
        ignore=lambda folder, names: [n for n in names if Path(folder) / n in skipped],
    )


def start_killable_run(workdir: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "snakemake", "--cores", "2", TARGET, "--configfile", *CONFIGS,
    ]  # fmt: skip
    return subprocess.Popen(
        command,
        cwd=workdir,
        env=snakemake_env(workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: kill snakemake and its jobs at once
    )


def kill_once_fine_tuning_is_under_way(job: subprocess.Popen, workdir: Path) -> None:
    """SIGKILL snakemake and its jobs when the first fine-tune has finished."""
    try:
        deadline = time.monotonic() + 900
        while not list((workdir / "results/finetune").rglob("metrics.json")):
            assert job.poll() is None, "snakemake ended before the kill"
            assert time.monotonic() < deadline, "no fine-tuning run finished within 15 min"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def without_provenance(run: dict) -> dict:
    """A run's record without what depends on how it ran: its provenance, and the name of
    its predictions file (``test_predictions_seed<s>.npz`` in a job of several seeds)."""
    return {k: v for k, v in run.items() if k not in ("provenance", "test_predictions")}


def shared_run(workflow_run: Path, killed: Path, killed_root: Path) -> dict:
    """The shared run's record of the cell and seed of one killed-run ``metrics.json``."""
    cell = killed.parent.parent.relative_to(killed_root)
    (block,) = (workflow_run / cell).glob("seeds*/metrics.json")
    seed = json.loads(killed.read_text())["seed"]
    (run,) = [run for run in json.loads(block.read_text()) if run["seed"] == seed]
    return run


def test_killed_snakemake_reruns_to_the_uninterrupted_runs(
    workflow_run: Path, tmp_path: Path
) -> None:
    """The killed snakemake leaves its lock, so the user runs --unlock, then reruns
    with --rerun-incomplete (the SLURM profile sets it) so Snakemake redoes any job
    whose output it had started."""
    workdir = tmp_path / "killed"
    copy_upstream_of_fine_tuning(workflow_run, workdir)
    drop_task(workdir, "region")
    (workdir / "killed.yaml").write_text(yaml.safe_dump(GRID))
    planned = planned_jobs(snakemake(workdir, "--dry-run", TARGET, configfiles=CONFIGS))
    assert planned == {"finetune": 4, "aggregate": 1}, planned
    kill_once_fine_tuning_is_under_way(start_killable_run(workdir), workdir)
    finished = list((workdir / "results/finetune").rglob("metrics.json"))
    assert not (workdir / "results/tables/runs.csv").exists()
    for metrics in finished:  # whatever exists under its final name is complete
        assert json.loads(metrics.read_text())["test"]

    snakemake(workdir, "--unlock", configfiles=CONFIGS)
    snakemake(workdir, "--rerun-incomplete", TARGET, configfiles=CONFIGS)
    rerun = sorted((workdir / "results/finetune").rglob("metrics.json"))
    assert len(rerun) == 4  # 2 inits x 2 tasks x 1 fraction x 1 seed
    for path in rerun:
        reference = shared_run(workflow_run, path, workdir)
        assert without_provenance(json.loads(path.read_text())) == without_provenance(reference)
    encoder = "results/init/simclr/pseed0/encoder.pt"
    assert (workdir / encoder).read_bytes() == (workflow_run / encoder).read_bytes()
    runs = pd.read_csv(workdir / "results/tables/runs.csv")
    full = pd.read_csv(workflow_run / "results/tables/runs.csv")
    same_cells = full[
        full["fraction"].isin(GRID["fractions"])
        & full["seed"].isin(GRID["seeds"])
        & full["task"].isin(runs["task"])
    ]
    pd.testing.assert_frame_equal(runs, same_cells.reset_index(drop=True), check_exact=True)
