"""A tiny synthetic cohort run through the real stages, shared by the fault tests.

Not a test module: ``tests/test_faults_*.py`` import it. The cohort comes
from the project's own generator (:mod:`medssl.datasets.synthetic`) and conversion, so the
fault tests exercise the files a real run produces, at a size that trains in
a second on one CPU thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from medssl import convert
from medssl.core import faults
from medssl.core.files import write_csv
from medssl.datasets.hdf5 import read_meta
from medssl.datasets.splits import make_partition, make_subsets, read_label_table
from medssl.datasets.synthetic import synthesize
from tests.finetuning.cohorts import finetune_cli_args
from tests.pretraining.hdf5_pool import SETTINGS, cli_args

SRC = Path(__file__).resolve().parents[2] / "src"
SYNTH = {"patients": 8, "series_per_patient": 1, "slices": 8, "matrix": 32, "seed": 0}
CONVERT = {"image_size": 32}
TASK = {"name": "region", "dataset": "d", "column": "region", "type": "multiclass"}
PRETRAIN = {**SETTINGS, "epochs": 3, "batch_size": 16}
FINETUNE = {"epochs": 4, "batch_size": 16, "lr": 0.001}


def build_cohort(root: Path) -> dict[str, Path]:
    """DICOM, HDF5, partition and subsets of 8 synthetic patients under ``root``."""
    synthesize(root / "dicom", root / "labels.csv", SYNTH)
    cohort = {"root": root, "dicom": root / "dicom", "h5": root / "d.h5"}
    # Through the command line, as the workflow and the fault tests run it.
    if convert.main(convert_args(cohort, root / "d.h5")) != 0:
        raise RuntimeError(f"conversion of the test cohort in {root} failed")
    labels = read_label_table(root / "labels.csv", "sop_uid", TASK["column"])
    partition = make_partition(read_meta(root / "d.h5"), labels, TASK)
    write_csv(root / "partition.csv", partition)
    write_csv(root / "seed0.csv", make_subsets(partition, seed=0))
    return {**cohort, "partition": root / "partition.csv", "subsets": root / "seed0.csv"}


def convert_args(cohort: dict[str, Path], out: Path) -> list[str]:
    """``medssl.convert`` arguments writing ``out`` and its rejects table beside it."""
    rejects = out.with_name(out.stem + ".rejects.csv")
    return [
        "--dicom-dir",
        str(cohort["dicom"]),
        "--out",
        str(out),
        "--rejects",
        str(rejects),
        "--settings",
        json.dumps(CONVERT),
        "--threads",
        "1",
    ]


def pretrain_args(cohort: dict[str, Path], out: Path, checkpoints: Path) -> list[str]:
    """``medssl.pretrain`` arguments (SimCLR, seed 3, CPU, one thread)."""
    return cli_args(cohort["h5"], out, checkpoints, PRETRAIN)


def finetune_args(
    cohort: dict[str, Path], out: Path, settings: dict | None = None, seed: int = 0
) -> list[str]:
    """``medssl.finetune`` arguments (scratch init, fraction 1, CPU, one thread)."""
    inputs = (cohort["h5"], cohort["partition"], cohort["subsets"], TASK)
    return [*finetune_cli_args(*inputs, settings or FINETUNE, out, seed), "--init", "scratch"]


def run_stage(
    module: str, args: list[str], fault: str | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """Run ``python -m medssl.<module>`` in a fresh process, optionally killed at ``fault``."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    env.pop("MEDSSL_FAULT_AT", None)
    if fault is not None:
        env["MEDSSL_FAULT_AT"] = fault
    return subprocess.run(
        [sys.executable, "-m", f"medssl.{module}", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_killed(main: Callable[[list[str]], int], args: list[str], fault: str) -> int:
    """Run a stage's ``main(args)`` in a forked child that SIGKILLs itself at ``fault``.

    Returns the signal that ended the child (``signal.SIGKILL`` when the fault
    point was reached), or ``-exit status`` when it ended on its own. Forking
    the test process, which has imported torch already, costs milliseconds
    where a fresh ``python -m`` costs seconds of imports; the code path after
    the import is the same. Callers run with one torch thread, so no OpenMP
    pool is forked.
    """
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            os.environ[faults.ENV] = fault
            faults._reached.clear()
            status = main(args)
        finally:
            os._exit(status if isinstance(status, int) else 1)
    _, wait_status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wait_status):
        return os.WTERMSIG(wait_status)
    return -os.WEXITSTATUS(wait_status)


def leftover_parts(root: Path) -> list[Path]:
    """Temporary files of atomic writes under ``root``."""
    return sorted(root.rglob(".*.part"))
