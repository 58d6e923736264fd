"""Killed jobs: SIGKILL each stage at named points, rerun, and get the uninterrupted result.

Every stage's command line runs in a forked process that kills itself at a
fault point (``MEDSSL_FAULT_AT``, see :mod:`medssl.core.faults`), exactly as a
cluster's time limit or the OOM killer would; one test does the same with
a fresh ``python -m medssl.convert`` process. After the kill no
output may look complete, and a rerun must finish with the same bytes (or, for
HDF5, the same arrays and attributes) as a run that was never interrupted.
Pre-training must resume from its last checkpoint; fine-tuning has none and
restarts, which gives the same numbers because it is deterministic.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from medssl import convert, finetune, pretrain
from medssl.models.backbones import sidecar_path
from medssl.pretraining import loop as trainer
from tests.faults.cohort import (
    build_cohort,
    convert_args,
    finetune_args,
    leftover_parts,
    pretrain_args,
    run_killed,
    run_stage,
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_cohort(tmp_path_factory.mktemp("cohort"))


def assert_killed(result: int | subprocess.CompletedProcess) -> None:
    """The process died of SIGKILL, i.e. it reached the fault point."""
    if isinstance(result, subprocess.CompletedProcess):
        assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-2000:])
    else:
        assert result == signal.SIGKILL, f"ended with {result} instead of SIGKILL"


def h5_content(path: Path) -> dict[str, object]:
    """Every dataset's bytes and every attribute, except the run's command line."""
    content: dict[str, object] = {}
    with h5py.File(path, "r") as handle:
        for name, value in handle.attrs.items():
            if name == "provenance":
                value = {k: v for k, v in json.loads(value).items() if k != "command"}
            content[f"@{name}"] = value
        handle.visititems(lambda name, obj: _add_dataset(content, name, obj))
    return content


def _add_dataset(content: dict[str, object], name: str, obj: object) -> None:
    if isinstance(obj, h5py.Dataset):
        values = np.asarray(obj[()])
        # Strings come back as Python objects: compare them, not their addresses.
        content[name] = values.tolist() if values.dtype == object else values.tobytes()


# --------------------------------------------------------------------------- conversion

CONVERT_POINTS = (
    "convert.series_written#1",  # HDF5 temp file holds one series
    "convert.series_written#4",  # half the series
    "convert.series_written#8",  # all series, metadata not yet written
    "before_rename:d.h5",  # HDF5 complete in its temp file, not renamed
    "before_rename:d.rejects.csv",  # HDF5 in place, rejects table not yet
)


@pytest.mark.parametrize("point", CONVERT_POINTS)
def test_killed_conversion_reruns_to_the_same_dataset(
    cohort: dict[str, Path], tmp_path: Path, point: str
) -> None:
    out, rejects = tmp_path / "d.h5", tmp_path / "d.rejects.csv"
    assert_killed(run_killed(convert.main, convert_args(cohort, out), point))
    if point == "before_rename:d.rejects.csv":
        # The HDF5 file is complete; Snakemake reruns the job for the missing table.
        assert h5_content(out) == h5_content(cohort["h5"]) and not rejects.exists()
    else:
        assert not out.exists() and not rejects.exists()
    assert leftover_parts(tmp_path), "a SIGKILLed writer cannot remove its temporary file"

    assert convert.main(convert_args(cohort, out)) == 0
    assert h5_content(out) == h5_content(cohort["h5"])
    assert rejects.read_bytes() == (cohort["root"] / "d.rejects.csv").read_bytes()
    assert not leftover_parts(tmp_path)


# --------------------------------------------------------------------------- pre-training

# 64 slices at batch 16: 4 steps per epoch, 3 epochs, a checkpoint after each.
PRETRAIN_POINTS = {
    "pretrain.step#2": 0,  # mid-epoch 1, before any checkpoint: starts again
    "pretrain.checkpoint_saved#1": 1,
    "pretrain.step#7": 1,  # mid-epoch 2
    "before_rename:checkpoint.pt#2": 1,  # checkpoint 2 half-done: checkpoint 1 stays
    "before_rename:encoder.json": 3,  # encoder in place, sidecar not yet
}


@pytest.fixture(scope="module")
def reference_encoder(cohort: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    before = torch.get_num_threads()
    root = tmp_path_factory.mktemp("pretrain_reference")
    out = root / "encoder.pt"
    assert pretrain.main(pretrain_args(cohort, out, root / "checkpoints")) == 0
    torch.set_num_threads(before)
    return out


@pytest.mark.parametrize("point", sorted(PRETRAIN_POINTS))
def test_killed_pretraining_resumes_to_identical_encoder(
    cohort: dict[str, Path],
    reference_encoder: Path,
    tmp_path: Path,
    point: str,
    one_thread,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out, checkpoints = tmp_path / "init" / "encoder.pt", tmp_path / "checkpoints"
    assert_killed(run_killed(pretrain.main, pretrain_args(cohort, out, checkpoints), point))
    assert not (out.exists() and sidecar_path(out).exists())
    checkpoint = checkpoints / trainer.CHECKPOINT_NAME
    resume_at = PRETRAIN_POINTS[point]
    if resume_at:
        assert trainer.load_checkpoint(checkpoint)["epoch"] == resume_at
    else:
        assert not checkpoint.exists()

    with caplog.at_level("INFO", logger="medssl.pretraining.loop"):
        assert pretrain.main(pretrain_args(cohort, out, checkpoints)) == 0
    resumed = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    if resume_at:
        assert len(resumed) == 1 and f"at epoch {resume_at} of 3" in resumed[0]
    else:
        assert not resumed
    assert out.read_bytes() == reference_encoder.read_bytes()
    got = json.loads(sidecar_path(out).read_text())
    want = json.loads(sidecar_path(reference_encoder).read_text())
    assert got["loss_history"] == want["loss_history"] and got["epochs"] == 3
    assert not leftover_parts(tmp_path)


# --------------------------------------------------------------------------- fine-tuning

FINETUNE_POINTS = (
    "finetune.epoch_end#1",
    "finetune.epoch_end#2",
    "finetune.epoch_end#3",
    "finetune.epoch_end#4",  # trained; test split not yet scored
    "before_rename:metrics.json",
)


@pytest.fixture(scope="module")
def reference_metrics(cohort: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("finetune_reference") / "metrics.json"
    assert finetune.main(finetune_args(cohort, out)) == 0
    torch.set_num_threads(before)
    return out


@pytest.mark.parametrize("point", FINETUNE_POINTS)
def test_killed_finetune_reruns_to_identical_metrics(
    cohort: dict[str, Path], reference_metrics: Path, tmp_path: Path, point: str, one_thread
) -> None:
    out = tmp_path / "scratch" / "region" / "frac1.0" / "seed0" / "metrics.json"
    assert_killed(run_killed(finetune.main, finetune_args(cohort, out), point))
    assert not out.exists()
    assert finetune.main(finetune_args(cohort, out)) == 0
    assert out.read_bytes() == reference_metrics.read_bytes()
    assert not leftover_parts(tmp_path)


# --------------------------------------------------------------------------- real processes


def test_fault_point_kills_a_fresh_stage_process(cohort: dict[str, Path], tmp_path: Path) -> None:
    """The hook works in ``python -m medssl.<stage>`` as Snakemake runs it, not only in a fork.

    (Conversion imports no torch, so a fresh process is cheap; test_pretrain
    kills a fresh pre-training process too.)
    """
    out = tmp_path / "d.h5"
    assert_killed(run_stage("convert", convert_args(cohort, out), fault="convert.series_written#2"))
    assert not out.exists() and leftover_parts(tmp_path)


# --------------------------------------------------------------------------- determinism


def test_pretraining_twice_gives_identical_encoder_bytes(
    cohort: dict[str, Path], reference_encoder: Path, tmp_path: Path, one_thread
) -> None:
    out = tmp_path / "again" / "encoder.pt"
    assert pretrain.main(pretrain_args(cohort, out, tmp_path / "checkpoints")) == 0
    assert out.read_bytes() == reference_encoder.read_bytes()
    other = tmp_path / "seed4" / "encoder.pt"
    args = pretrain_args(cohort, other, tmp_path / "checkpoints4")
    args[args.index("--seed") + 1] = "4"
    assert pretrain.main(args) == 0
    assert other.read_bytes() != reference_encoder.read_bytes()


def test_finetune_twice_gives_identical_metrics_bytes(
    cohort: dict[str, Path], reference_metrics: Path, tmp_path: Path, one_thread
) -> None:
    out = tmp_path / "again" / "metrics.json"
    assert finetune.main(finetune_args(cohort, out)) == 0
    assert out.read_bytes() == reference_metrics.read_bytes()
    other = tmp_path / "seed1" / "metrics.json"
    assert finetune.main(finetune_args(cohort, other, seed=1)) == 0
    assert json.loads(other.read_text())["history"] != json.loads(out.read_text())["history"]


# --------------------------------------------------------------------------- provenance


def _assert_provenance(prov: dict, stage: str, seed: int | None) -> None:
    """Version and commit, the settings that made the file, package versions and the seed."""
    assert prov["stage"] == stage and prov["medssl_version"]
    assert "git_commit" in prov  # None only outside a git checkout
    assert prov["settings"] and prov["seed"] == seed
    assert {"python", "torch", "numpy", "h5py"} <= set(prov["packages"])


def test_stage_outputs_carry_provenance(
    cohort: dict[str, Path], reference_encoder: Path, reference_metrics: Path
) -> None:
    with h5py.File(cohort["h5"], "r") as handle:
        converted = json.loads(handle.attrs["provenance"])
    _assert_provenance(converted, "convert", None)
    assert converted["settings"]["image_size"] == 32
    encoder = json.loads(sidecar_path(reference_encoder).read_text())["provenance"]
    _assert_provenance(encoder, "pretrain", 3)
    assert encoder["settings"]["simclr"] == {"temperature": 0.2, "proj_dim": 16}
    metrics = json.loads(reference_metrics.read_text())["provenance"]
    _assert_provenance(metrics, "finetune", 0)
    assert metrics["settings"]["finetune"]["epochs"] == 4
