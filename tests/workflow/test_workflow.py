"""The whole Snakemake workflow on the smallest config, as a user runs it.

One module-scoped run of ``snakemake --cores 2`` on a copy of the workflow;
the tests then check the files produced and what a rerun would do (by dry
runs, which is how Snakemake itself decides what to rerun).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tests.workflow.tree import REPO, TINY, copy_workflow

pytestmark = pytest.mark.workflow


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake in ``workdir`` with the tiny config, using this interpreter's env."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(workdir / "src")
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        "2",
        "--configfile",
        "tiny.yaml",
        *args,
    ]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        )
    return result


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from a dry run's "Job stats" table."""
    text = result.stdout + result.stderr
    counts: dict[str, int] = {}
    if "Job stats:" not in text:
        return counts
    table = text.split("Job stats:", 1)[1]
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if not match:
            break
        if match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    copy_workflow(workdir)
    started = time.perf_counter()
    snakemake(workdir)
    print(f"whole workflow on the tiny config: {time.perf_counter() - started:.1f} s")
    return workdir


def tiny_grid() -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
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
    assert set(summary["mark"]) <= {"best", "equivalent", "worse"}
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
    assert (workflow_run / "benchmarks/pretrain/simclr.tsv").is_file()


def test_second_run_does_nothing(workflow_run: Path) -> None:
    result = snakemake(workflow_run, "--dry-run")
    assert planned_jobs(result) == {}
    assert "Nothing to be done" in result.stdout + result.stderr


def test_finetune_setting_reruns_finetunes_and_what_follows(workflow_run: Path) -> None:
    changed = workflow_run / "changed.yaml"
    changed.write_text(yaml.safe_dump({"finetune": {"lr": 0.0005}}))
    result = snakemake(workflow_run, "--dry-run", "--configfile", "tiny.yaml", "changed.yaml")
    jobs = planned_jobs(result)
    grid = tiny_grid()
    n_runs = len(grid["inits"]) * len(grid["tasks"]) * len(grid["fractions"]) * len(grid["seeds"])
    assert jobs.pop("finetune") == n_runs
    assert jobs.pop("plots") == len(grid["tasks"])
    assert jobs.pop("bars") == jobs.pop("task_tables") == len(grid["tasks"])
    assert jobs.pop("heatmap") == len(grid["fractions"])
    assert jobs == {
        "aggregate": 1,
        "stats": 1,
        "tables": 1,
        "efficiency": 1,
        "forest": 1,
        "all": 1,
    }


def test_seeds_per_job_runs_blocks_of_seeds(workflow_run: Path) -> None:
    """compute.seeds_per_job: 2 puts both tiny seeds into one job per cell."""
    blocks = workflow_run / "blocks.yaml"
    blocks.write_text(yaml.safe_dump({"compute": {"seeds_per_job": 2}}))
    result = snakemake(
        workflow_run, "--dry-run", "--printshellcmds", "--configfile", "tiny.yaml", "blocks.yaml"
    )
    grid = tiny_grid()
    cells = len(grid["inits"]) * len(grid["tasks"]) * len(grid["fractions"])
    assert planned_jobs(result)["finetune"] == cells
    text = result.stdout + result.stderr
    assert "/seeds0_1/metrics.json" in text
    assert "--seed 0 1 " in text


def test_editing_finetune_code_reruns_finetunes_only(workflow_run: Path) -> None:
    # Snakemake ignores a newer mtime when the content's checksum is unchanged,
    # so this is a real edit of the copy's finetune.py, undone afterwards.
    source = workflow_run / "src/medssl/finetune.py"
    original_text = source.read_text()
    original = source.stat()
    source.write_text(original_text + "\n# an edit\n")
    try:
        jobs = planned_jobs(snakemake(workflow_run, "--dry-run"))
    finally:
        source.write_text(original_text)
        os.utime(source, ns=(original.st_atime_ns, original.st_mtime_ns))
    assert "finetune" in jobs
    assert not {"synthesize", "convert", "split", "subsample", "pretrain"} & set(jobs)
    assert {"aggregate", "stats", "tables", "plots"} <= set(jobs)


def test_report_contains_figures(workflow_run: Path) -> None:
    snakemake(workflow_run, "--report", "results/report.html")
    report = workflow_run / "results/report.html"
    assert report.stat().st_size > 10_000
    text = report.read_text(errors="replace")
    for name in ("label_efficiency", "bars_", "heatmap_frac", "forest", "summary_"):
        assert name in text


def test_partial_target_summarises_what_exists(workflow_run: Path) -> None:
    assert "partial" not in planned_jobs(snakemake(workflow_run, "--dry-run"))
    # Options before the target: --configfile takes every word that follows it.
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


def test_killed_snakemake_reruns_and_gives_byte_identical_tables(
    workflow_run: Path, tmp_path: Path
) -> None:
    """SIGKILL snakemake and its jobs mid-run, rerun, and compare with the uninterrupted run.

    The killed snakemake leaves its lock, so the user runs --unlock, then reruns
    with --rerun-incomplete (the SLURM profile sets it) so Snakemake redoes any
    job whose output it had started; tables equal the uninterrupted run's byte
    for byte, which is the determinism guarantee across processes.
    """
    workdir = copy_workflow(tmp_path / "killed")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(workdir / "src")
    job = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "tiny.yaml"],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: kill snakemake and its jobs at once
    )
    try:
        deadline = time.monotonic() + 900
        # Kill once fine-tuning is under way: some runs finished, others running.
        while not list((workdir / "results/finetune").rglob("metrics.json")):
            assert job.poll() is None, "snakemake ended before the kill"
            assert time.monotonic() < deadline, "no fine-tuning run finished within 15 min"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    finished = list((workdir / "results/finetune").rglob("metrics.json"))
    assert not (workdir / "results/tables/runs.csv").exists()
    for metrics in finished:  # whatever exists under its final name is complete
        assert json.loads(metrics.read_text())["test"]

    # A killed snakemake leaves its lock behind; --unlock is the documented way out.
    snakemake(workdir, "--unlock")
    snakemake(workdir, "--rerun-incomplete")
    reference = workflow_run / "results/tables"
    compared = 0
    for table in sorted(reference.iterdir()):
        if table.suffix in {".csv", ".md", ".tex"}:
            rerun = workdir / "results/tables" / table.name
            assert rerun.read_bytes() == table.read_bytes(), table.name
            compared += 1
    assert compared >= 5
    metrics = sorted((workflow_run / "results/finetune").rglob("metrics.json"))
    for path in metrics:
        twin = workdir / path.relative_to(workflow_run)
        assert json.loads(twin.read_text())["test"] == json.loads(path.read_text())["test"]
