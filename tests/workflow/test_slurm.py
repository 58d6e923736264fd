"""The workflow through the SLURM profile on a real (one-node) SLURM cluster.

``scripts/slurm-test-cluster.sh`` installs and starts munged, slurmctld and
slurmd with two fake GPUs. The workflow then runs as a user runs it on a
cluster, ``snakemake --cores all --profile slurm``, on a copy of the repository
whose profile is the shipped one with its sizes shrunk to this node and its
status polling shortened, on the smallest grid (two fractions, one seed, two
tasks); its ``runs.csv`` must equal the same cells of the shared local run.
Select with ``-m slurm``, leave out with ``-m 'not slurm'``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.workflow.tree import REPO, SMALLEST, base_config, copy_workflow, drop_task

SCRIPT = REPO / "scripts" / "slurm-test-cluster.sh"
PROFILE = Path("slurm") / "config.v8+.yaml"
# The tiny config (merged on config.yaml) on the smallest grid, without the region
# task; fine-tunes in groups of four, so that there are two groups.
DROPPED_TASK = "region"
GROUP_SIZE = 4
_DEFAULT = base_config()
TASKS = {name: task for name, task in _DEFAULT["tasks"].items() if name != DROPPED_TASK}
SEGMENTATION_TASKS = [name for name, task in TASKS.items() if task["type"] == "segmentation"]
FINETUNES = (
    len(_DEFAULT["inits"]) * len(TASKS) * len(SMALLEST["fractions"]) * len(SMALLEST["seeds"])
)
GROUPS = -(-FINETUNES // GROUP_SIZE)
LOCAL_RULES = {"aggregate", "stats", "tables", "plots", "all"}
GPU_RULES = {"pretrain", "finetune"}
LIMIT_S = 1200
PRETRAIN_CPUS = min(2, len(os.sched_getaffinity(0)))

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]


def cluster_unavailable() -> str | None:
    """Why the test cluster cannot be started here, or None."""
    if shutil.which("slurmctld") and shutil.which("munged") and os.geteuid() == 0:
        return None
    if os.geteuid() != 0:
        return "needs root to start munged, slurmctld and slurmd"
    if shutil.which("apt-get") is None:
        return "slurm-wlm and munge are not installed and apt-get is unavailable"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = cluster_unavailable()
    if reason:
        pytest.skip(f"SLURM test cluster: {reason}")
    # Not under pytest's private temp folder: munged runs as the munge user.
    state = Path(tempfile.mkdtemp(prefix="medssl-slurm-"))
    # Finished jobs stay in scontrol for MinJobAge: longer than the whole run.
    env = {
        **os.environ,
        "MEDSSL_SLURM_STATE": str(state),
        "MEDSSL_SLURM_GPUS": "2",
        "MEDSSL_SLURM_MIN_JOB_AGE": str(3 * LIMIT_S),
    }
    started = subprocess.run(
        [str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900
    )
    try:
        assert started.returncode == 0, f"cluster did not start:\n{started.stderr}"
        yield {"SLURM_CONF": str(state / "etc" / "slurm.conf"), "state": state}
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, timeout=120, check=False)
        for daemon in ("munged", "slurmctld", "slurmd"):
            pidfile = state / "run" / f"{daemon}.pid"
            if pidfile.exists():
                pid = pidfile.read_text().strip()
                assert not Path(f"/proc/{pid}").exists(), f"{daemon} ({pid}) still running"
        shutil.rmtree(state, ignore_errors=True)


def copy_workflow_with_overlay(workdir: Path) -> None:
    copy_workflow(workdir)
    drop_task(workdir, DROPPED_TASK)
    (workdir / "overlay.yaml").write_text(yaml.safe_dump(SMALLEST))


def shrink_profile(path: Path) -> dict:
    """The shipped profile, resized to this node, with fast status polling.

    Everything else (executor, per-rule resources, groups, resource scopes)
    stays as shipped, so the test runs the profile users run.
    """
    profile = yaml.safe_load(path.read_text())
    profile["default-resources"].update(slurm_partition="debug", mem_mb=500, runtime=10)
    # One CPU per job, so the two fine-tune groups run side by side on the
    # two fake GPUs of a 2-core machine; pre-training (alone at its time) gets
    # PRETRAIN_CPUS, to check that per-rule CPUs reach sbatch.
    for resources in profile["set-resources"].values():
        resources.update(cpus_per_task=1, mem_mb=1000, runtime=10)
    profile["set-resources"]["pretrain"]["cpus_per_task"] = PRETRAIN_CPUS
    # The shared local run uses the tiny config's one thread per stage.
    profile["set-threads"] = dict.fromkeys(profile["set-threads"], 1)
    profile["group-components"] = [f"finetunes={GROUP_SIZE}"]
    profile.update(
        {
            "jobs": 8,
            "retries": 0,
            "latency-wait": 5,
            # No slurmdbd on the test cluster: see docs/slurm.md.
            "slurm-status-command": "squeue",
            "seconds-between-status-checks": 2,
            "slurm-init-seconds-before-status-checks": 2,
            "slurm-keep-successful-logs": True,
        }
    )
    path.write_text(yaml.safe_dump(profile))
    return profile


def snakemake(workdir: Path, *args: str, env: dict | None = None) -> str:
    environment = {**os.environ, **(env or {})}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    environment["PYTHONPATH"] = str(workdir / "src")
    command = [
        "timeout", "-s", "INT", "-k", "30", str(LIMIT_S),
        sys.executable, "-m", "snakemake", "--configfile", "tiny.yaml", "overlay.yaml", *args,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=workdir, env=environment, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"snakemake {' '.join(args)} failed:\n{output}"
    return output


@pytest.fixture(scope="module")
def slurm_run(cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("slurm-run")
    copy_workflow_with_overlay(workdir)
    shrink_profile(workdir / PROFILE)
    started = time.perf_counter()
    env = {"SLURM_CONF": cluster["SLURM_CONF"]}
    log = snakemake(workdir, "--cores", "all", "--profile", "slurm", env=env)
    seconds = time.perf_counter() - started
    print(f"tiny config through the SLURM profile: {seconds:.1f} s")
    return {"workdir": workdir, "log": log, "env": env, "state": cluster["state"]}


def submitted(log: str) -> dict[str, str]:
    """Snakemake job id (or group id) -> SLURM job id, from the run's log."""
    return dict(re.findall(r"Job (\S+) has been submitted with SLURM jobid (\d+)", log))


def job_info(slurm_id: str, env: dict) -> dict[str, str]:
    """``scontrol show job`` as a dict (finished jobs stay for MinJobAge s)."""
    result = subprocess.run(
        ["timeout", "30", "scontrol", "-o", "show", "job", slurm_id],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", result.stdout))


def test_every_cluster_job_went_through_sbatch_and_completed(slurm_run: dict) -> None:
    log = slurm_run["log"]
    jobs = submitted(log)
    # synthesize, convert, a mask job per segmentation task, a split and a
    # subsample per task, pretrain, the fine-tune groups
    expected = 1 + 1 + len(SEGMENTATION_TASKS) + 2 * len(TASKS) + 1 + GROUPS
    assert len(jobs) == expected, log
    rules_run = set(re.findall(r"^\s*(?:local)?rule (\w+):", log, flags=re.MULTILINE))
    local_submitted = {rule for rule in LOCAL_RULES if f"rule_{rule}" in log}
    assert not local_submitted, f"local rules were submitted: {local_submitted}"
    assert {"synthesize", "convert", "split", "subsample", "pretrain", "finetune"} <= rules_run
    # jobcomp/filetxt: the cluster's permanent record of every finished job.
    record = (slurm_run["state"] / "log" / "jobcomp.log").read_text()
    states = dict(re.findall(r"JobId=(\d+) .*?JobState=(\w+)", record))
    for slurm_id in jobs.values():
        assert states.get(slurm_id) == "COMPLETED", f"job {slurm_id}: {states.get(slurm_id)}"
        assert job_info(slurm_id, slurm_run["env"])["JobState"] == "COMPLETED"


def test_gpu_jobs_asked_for_one_gpu_and_their_cpus(slurm_run: dict) -> None:
    log = slurm_run["log"]
    gpu_jobs = re.findall(r"SLURM jobid (\d+) \(log: \S*/(rule_pretrain|group_finetunes)", log)
    assert {kind for _, kind in gpu_jobs} == {"rule_pretrain", "group_finetunes"}, log
    for slurm_id, kind in gpu_jobs:
        info = job_info(slurm_id, slurm_run["env"])
        assert info.get("TresPerJob") == "gres:gpu:1", info
        cpus = PRETRAIN_CPUS if kind == "rule_pretrain" else 1
        assert int(info["NumCPUs"]) == cpus, info
    cpu_jobs = set(submitted(log).values()) - {slurm_id for slurm_id, _ in gpu_jobs}
    for slurm_id in cpu_jobs:
        info = job_info(slurm_id, slurm_run["env"])
        assert "gpu" not in info.get("TresPerJob", ""), info


def test_grouped_finetunes_ran_in_one_job_per_group(slurm_run: dict) -> None:
    logs = sorted((slurm_run["workdir"] / ".snakemake/slurm_logs").rglob("*.log"))
    group_logs = [path for path in logs if "group_finetunes" in str(path)]
    assert len(group_logs) == GROUPS
    finished = [path.read_text().count("Finished jobid") for path in group_logs]
    assert sum(min(count, GROUP_SIZE) for count in finished) == FINETUNES, finished


def test_outputs_equal_the_local_run(slurm_run: dict, workflow_run: Path) -> None:
    """Every run on the cluster equals the same cell of the shared local run."""
    on_slurm = pd.read_csv(slurm_run["workdir"] / "results/tables/runs.csv")
    local = pd.read_csv(workflow_run / "results/tables/runs.csv")
    same_cells = local[
        local["fraction"].isin(SMALLEST["fractions"])
        & local["seed"].isin(SMALLEST["seeds"])
        & local["task"].isin(TASKS)
    ].reset_index(drop=True)
    assert on_slurm.groupby(["init", "task", "fraction", "seed"]).ngroups == FINETUNES
    pd.testing.assert_frame_equal(on_slurm, same_cells, check_exact=True)
