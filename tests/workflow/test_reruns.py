"""Reruns follow the real change: what a code edit reruns, seen by dry runs of the shared run.

Each test edits a source file of the run's copy, asks Snakemake what it would
run, and restores the file with its time stamp, so the run stays complete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.workflow.tree import TINY, planned_jobs, snakemake

pytestmark = pytest.mark.workflow

UPSTREAM = {"synthesize", "convert", "masks", "split", "subsample"}
REPORT = {"aggregate", "stats", "tables", "plots", "efficiency", "costs", "all"}
PRETRAIN_RUNS = len(yaml.safe_load(TINY.read_text())["pretrain"]["seeds"])
"""One pre-training job per seed of the tiny config's ``pretrain.seeds``."""


@contextlib.contextmanager
def edited(source: Path, change: Callable[[str], str]) -> Iterator[None]:
    """``source`` rewritten by ``change`` for the duration of the block."""
    text = source.read_text()
    stat = source.stat()
    changed = change(text)
    assert changed != text, f"the edit does not change {source.name}"
    source.write_text(changed)
    try:
        yield
    finally:
        source.write_text(text)
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def jobs_after_edit(workdir: Path, module: str, change: Callable[[str], str]) -> dict[str, int]:
    with edited(workdir / "src" / "medssl" / module, change):
        return planned_jobs(snakemake(workdir, "--dry-run"))


def first_docstring_line(text: str) -> str:
    return text.split('"""', 2)[1].splitlines()[0]


def test_docstring_comment_and_layout_edits_rerun_nothing(workflow_run: Path) -> None:
    for module in ("finetuning/loop.py", "pretraining/loop.py", "datasets/splits.py"):

        def cosmetic(text: str) -> str:
            line = first_docstring_line(text)
            return text.replace(line, line + " (see the docs)", 1) + "\n\n# a closing remark\n"

        assert jobs_after_edit(workflow_run, module, cosmetic) == {}, module


def test_editing_finetune_code_reruns_finetunes_and_the_report_only(workflow_run: Path) -> None:
    jobs = jobs_after_edit(
        workflow_run, "finetuning/loop.py", lambda text: text + "\nEDITED = True\n"
    )
    assert jobs.get("finetune", 0) > 0
    assert not (UPSTREAM | {"pretrain"}) & set(jobs)
    assert set(jobs) >= REPORT


def test_editing_a_method_reruns_that_methods_pretraining_and_its_fine_tunes(
    workflow_run: Path,
) -> None:
    every_finetune = planned_jobs(snakemake(workflow_run, "--dry-run", "--forcerun", "finetune"))
    jobs = jobs_after_edit(
        workflow_run, "pretraining/methods/simclr.py", lambda text: text + "\nEDITED = True\n"
    )
    assert jobs.pop("pretrain") == PRETRAIN_RUNS
    # Only the simclr init's fine-tunes: half of all fine-tunes (scratch keeps its own).
    assert jobs.pop("finetune") * 2 == every_finetune["finetune"]
    assert not UPSTREAM & set(jobs)


def test_editing_another_method_reruns_nothing(workflow_run: Path) -> None:
    for method in ("swav", "spark"):
        jobs = jobs_after_edit(
            workflow_run, f"pretraining/methods/{method}.py", lambda text: text + "\nEDITED = 1\n"
        )
        assert jobs == {}, method


def test_editing_the_shared_pretraining_loop_reruns_pretraining(workflow_run: Path) -> None:
    jobs = jobs_after_edit(
        workflow_run, "pretraining/loop.py", lambda text: text + "\nEDITED = True\n"
    )
    assert jobs.get("pretrain") == PRETRAIN_RUNS
    assert not UPSTREAM & set(jobs)
