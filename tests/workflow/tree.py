"""Copies of the workflow for tests that run Snakemake on it, and how they run it.

Tests run Snakemake in a temporary copy so they can edit code or config and
leave results there without touching the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "src", "envs", "slurm")
SMALLEST = {"fractions": [0.5, 1.0], "seeds": [0]}
TINY_INITS = ("scratch", "simclr")
"""The inits the whole-workflow tests run. The default's SparK needs slices of 64
pixels or more and BYOL adds nothing a test checks, so the copies keep scratch and
one pre-trained init (an overlay can add inits, not remove them)."""
"""Overlay on the tiny config for the runs that test a mechanism (killing, SLURM) rather
than the grid: one seed, and the two fractions a label-efficiency slope needs;
:func:`drop_task` removes a task too."""


def base_config() -> dict:
    """``config.yaml`` with the inits and methods cut to :data:`TINY_INITS`."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["inits"] = {name: config["inits"][name] for name in TINY_INITS}
    methods = config["pretrain"]["methods"]
    config["pretrain"]["methods"] = [method for method in methods if method in TINY_INITS]
    return config


def copy_workflow(workdir: Path, names: tuple[str, ...] = WORKFLOW_FILES) -> Path:
    """Copy the workflow (its config cut by :func:`base_config`, and the tiny config as
    ``tiny.yaml``) into ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in names:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif name == "config.yaml":
            (workdir / name).write_text(yaml.safe_dump(base_config(), sort_keys=False))
        else:
            shutil.copy2(source, workdir / name)
    shutil.copy2(TINY, workdir / "tiny.yaml")
    return workdir


def drop_task(workdir: Path, task: str) -> None:
    """Remove a task from the copy's ``config.yaml`` (an overlay can add keys, not remove them)."""
    path = workdir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    del config["tasks"][task]
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def snakemake_env(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This interpreter's environment, running the copy's own medssl."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(workdir / "src")
    return env


def snakemake(
    workdir: Path, *args: str, check: bool = True, configfiles: tuple[str, ...] = ("tiny.yaml",)
) -> subprocess.CompletedProcess:
    """Run snakemake in ``workdir`` with the tiny config (options before any target)."""
    command = [
        sys.executable, "-m", "snakemake", "--cores", "2", *args, "--configfile", *configfiles,
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=workdir, env=snakemake_env(workdir), capture_output=True, text=True
    )
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
