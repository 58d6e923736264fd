"""Copies of the workflow for tests that run Snakemake on it.

Tests run Snakemake in a temporary copy so they can edit code or config and
leave results there without touching the checkout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "src", "envs", "slurm")


def copy_workflow(workdir: Path, names: tuple[str, ...] = WORKFLOW_FILES) -> Path:
    """Copy the workflow (and the tiny config as ``tiny.yaml``) into ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in names:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, workdir / name)
    shutil.copy2(TINY, workdir / "tiny.yaml")
    return workdir
