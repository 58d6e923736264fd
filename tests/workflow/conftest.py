"""The one whole-workflow run that every test reading its outputs shares."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.workflow.tree import copy_workflow, snakemake


@pytest.fixture(scope="session")
def workflow_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``snakemake --cores 2`` on a copy of the workflow with the tiny config.

    Tests that change the copy (code edits, overlays) undo their change and
    look at it with dry runs only, so the run stays complete for the others.
    """
    workdir = tmp_path_factory.mktemp("workflow")
    copy_workflow(workdir)
    started = time.perf_counter()
    snakemake(workdir)
    print(f"whole workflow on the tiny config: {time.perf_counter() - started:.1f} s")
    return workdir
