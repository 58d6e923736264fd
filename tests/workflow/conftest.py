"""The one whole-workflow run that every test reading its outputs shares."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

import pytest

from tests.workflow.tree import copy_workflow, snakemake

COMPLETE = ".workflow-run-complete"


def build_workflow_run(workdir: Path) -> None:
    """``snakemake --cores 2`` on a fresh copy of the workflow with the tiny config."""
    copy_workflow(workdir)
    started = time.perf_counter()
    snakemake(workdir)
    print(f"whole workflow on the tiny config: {time.perf_counter() - started:.1f} s")


@pytest.fixture(scope="session")
def workflow_run(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The tiny config's run, made once per test session.

    Tests that change the copy (code edits, overlays) undo their change and
    look at it with dry runs only, so the run stays complete for the others.
    Under pytest-xdist the first worker to ask makes it in the session's
    shared temporary folder, under a lock, and the other worker reuses it.
    """
    if worker_id == "master":
        workdir = tmp_path_factory.mktemp("workflow")
        build_workflow_run(workdir)
        return workdir
    shared = tmp_path_factory.getbasetemp().parent  # this session's, common to its workers
    workdir = shared / "workflow"
    with open(shared / "workflow.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / COMPLETE).exists():
            build_workflow_run(workdir)
            (shared / COMPLETE).touch()
    return workdir
