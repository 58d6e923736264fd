"""Bad input and broken storage: crafted checkpoints, broken HDF5 and DICOM, escaping
paths, full disks, unwritable folders, diverged runs. Each must stop with an
error naming the file or key, and leave no output that looks complete."""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from medssl import aggregate as aggregate_stage
from medssl.analysis import runs as aggregate
from medssl.core import files as io
from medssl.datasets.hdf5 import load_images, open_h5
from medssl.datasets.synthetic import synthesize
from medssl.models.backbones import build_backbone, load_encoder, save_encoder
from medssl.pipeline import paths
from medssl.pipeline.config import ConfigError, check_references, validate_config
from medssl.pretraining import loop as trainer
from tests.faults.cohort import SRC, leftover_parts

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- crafted pickles


class _RunsCode:
    """Unpickling this object runs ``exec`` on the payload: the classic pickle attack."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_crafted_pickle_is_proven_to_run_code_when_trusted(tmp_path: Path) -> None:
    """The payload is live: plain ``pickle.loads`` runs it, so the refusals below mean something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.exists()


def test_crafted_encoder_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    encoder = tmp_path / "encoder.pt"
    save_encoder(build_backbone("resnet_small", 1), encoder, "resnet_small", {"method": "x"})
    torch.save({"conv1.weight": _RunsCode(marker)}, encoder)
    with pytest.raises(ValueError, match=r"encoder\.pt: cannot load as a plain state dict"):
        load_encoder(encoder)
    assert not marker.exists()


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    checkpoint = tmp_path / trainer.CHECKPOINT_NAME
    torch.save({"epoch": 1, "model": _RunsCode(marker)}, checkpoint)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer.load_checkpoint(checkpoint)
    assert not marker.exists()


# --------------------------------------------------------------------------- HDF5 and DICOM


def test_broken_hdf5_errors_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an HDF5 file" * 100)
    with pytest.raises(OSError, match=r"garbage\.h5: cannot open as HDF5"):
        open_h5(garbage)
    empty = tmp_path / "empty.h5"
    import h5py

    h5py.File(empty, "w").close()
    with pytest.raises(ValueError, match=r"empty\.h5: not a medssl dataset"):
        load_images(empty)


def test_truncated_hdf5_error_names_the_file(tmp_path: Path) -> None:
    import h5py

    whole = tmp_path / "whole.h5"
    with h5py.File(whole, "w") as handle:
        handle.create_dataset("images", data=torch.zeros(64, 1, 32, 32).numpy())
        handle.create_group("meta")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    with pytest.raises(OSError, match=r"cut\.h5"):
        load_images(cut)


def test_broken_dicom_files_are_rejected_by_name(tmp_path: Path) -> None:
    from medssl.datasets.conversion import convert

    dicom = tmp_path / "dicom"
    synthesize(dicom, tmp_path / "labels.csv", {"patients": 1, "slices": 4, "matrix": 16})
    files = sorted(p for p in dicom.rglob("*") if p.is_file())
    (dicom / "garbage.dcm").write_bytes(b"\x00" * 300)
    truncated = dicom / "truncated.dcm"
    truncated.write_bytes(files[0].read_bytes()[:400])
    convert(dicom, tmp_path / "d.h5", tmp_path / "rejects.csv", {"image_size": 16})
    rejects = pd.read_csv(tmp_path / "rejects.csv").set_index("file")
    names = {Path(f).name: reason for f, reason in rejects["reason"].items()}
    assert "garbage.dcm" in names and "truncated.dcm" in names
    assert all(reason for reason in names.values())


# --------------------------------------------------------------------------- config paths


@pytest.fixture(scope="module")
def base_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


ESCAPING = ["..", "../outside", "../../etc/passwd", "/tmp/abs", "a/../b", "a/b", "."]


@pytest.mark.parametrize("name", ESCAPING)
@pytest.mark.parametrize("section", ["dataset", "task", "init"])
def test_config_names_cannot_escape_results(base_config: dict, section: str, name: str) -> None:
    config = copy.deepcopy(base_config)
    if section == "dataset":
        datasets = config["data"]["datasets"]
        datasets[name] = datasets.pop(next(iter(datasets)))
        parent = "data.datasets"
    elif section == "task":
        config["tasks"][name] = config["tasks"].pop(next(iter(config["tasks"])))
        parent = "tasks"
    else:
        config["inits"][name] = {"source": "scratch"}
        parent = "inits"
    key = f"{parent}.{name}"
    # The schema names the section and the offending name before any job starts...
    with pytest.raises(ConfigError, match=re.escape(f"{parent}: {name!r}")):
        validate_config(copy.deepcopy(config))
    # ...and the path check holds on its own, without the schema's name pattern.
    problems = [p for p in paths.check_outputs(config) if p.startswith(key)]
    assert problems and "outside" in problems[0]


def test_valid_names_and_inputs_anywhere_pass(base_config: dict, tmp_path: Path) -> None:
    config = validate_config(copy.deepcopy(base_config))
    assert list(paths.check_outputs(config)) == []
    assert not [p for p in check_references(config) if "outside" in p]
    assert not paths.escapes("finetune/scratch/nodule/frac0.5/seed0/metrics.json")
    for bad in ("../x", "/x", "a\\b", "", "x/../../y"):
        assert paths.escapes(bad), bad


# --------------------------------------------------------------------------- storage


def _raise(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.ENOSPC, "disk is full"), (errno.EDQUOT, "quota"), (errno.EFBIG, "size limit")],
)
def test_full_disk_names_the_file_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    target = tmp_path / "results" / "metrics.json"
    monkeypatch.setattr(Path, "write_text", _raise(code))
    with pytest.raises(OSError, match=rf"cannot write .*metrics\.json: .*{words}") as caught:
        io.write_json(target, {"a": 1})
    assert caught.value.errno == code
    assert not target.exists() and not leftover_parts(tmp_path)


def test_full_disk_during_encoder_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "init" / "encoder.pt"
    monkeypatch.setattr(Path, "write_bytes", _raise(errno.ENOSPC))
    with pytest.raises(OSError, match=r"encoder\.pt: the disk is full"):
        save_encoder(build_backbone("resnet_small", 1), out, "resnet_small", {})
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not leftover_parts(tmp_path)


def test_read_only_file_system_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io.tempfile, "mkstemp", _raise(errno.EROFS))
    with pytest.raises(OSError, match=r"runs\.csv: the file system is read-only"):
        io.write_csv(tmp_path / "runs.csv", pd.DataFrame({"a": [1]}))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_unwritable_results_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tables"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=r"summary\.md: permission denied"):
            io.write_text(folder / "summary.md", "x")
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_file_size_limit_stops_conversion_cleanly(tmp_path: Path) -> None:
    """A real process hitting RLIMIT_FSIZE (EFBIG), as on a quota'd scratch disk."""
    dicom = tmp_path / "dicom"
    synthesize(dicom, tmp_path / "labels.csv", {"patients": 2, "slices": 8, "matrix": 64})
    out = tmp_path / "out" / "d.h5"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    job = subprocess.run(
        [sys.executable, "-m", "medssl.convert", str(dicom), str(out), "--image-size", "64"],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=120,
    )
    assert job.returncode != 0
    assert "d.h5" in job.stderr and ("too large" in job.stderr.lower() or "27" in job.stderr)
    assert not out.exists() and not leftover_parts(tmp_path / "out")


# --------------------------------------------------------------------------- divergence


def test_write_json_writes_nan_as_null_and_refuses_infinity(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    io.write_json(path, {"test": {"auc": math.nan, "f1": 0.5}, "h": [float("nan")]})
    assert json.loads(path.read_text()) == {"test": {"auc": None, "f1": 0.5}, "h": [None]}
    assert "NaN" not in path.read_text()
    with pytest.raises(ValueError, match=r"m2\.json: key 'test\.auc' is inf"):
        io.write_json(tmp_path / "m2.json", {"test": {"auc": math.inf}})
    assert not (tmp_path / "m2.json").exists()


def test_aggregate_refuses_a_nan_metric_naming_the_file(tmp_path: Path) -> None:
    payload = {
        "init": "scratch",
        "task": "nodule",
        "task_type": "binary",
        "fraction": 0.5,
        "seed": 0,
        "n_train": 10,
        "best_epoch": 1,
        "test": {"auc": math.nan, "accuracy": 0.5},
    }
    bad = tmp_path / "diverged" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(payload))  # plain json writes the literal NaN
    with pytest.raises(aggregate.MetricsError, match=r"diverged/metrics\.json: metric 'test\.auc'"):
        aggregate.build_runs([bad])
    out = tmp_path / "runs.csv"
    assert aggregate_stage.main(["--out", str(out), str(bad)]) == 1
    assert not out.exists()


def test_stale_temporary_files_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "runs.csv"
    stale = tmp_path / ".runs.csv.k1ll3d_x.part"
    other = tmp_path / ".runs.csv.provenance.json.abcdefgh.part"  # another file's temp
    stale.write_text("half")
    other.write_text("half")
    io.write_text(target, "done\n")
    assert target.read_text() == "done\n"
    assert not stale.exists() and other.exists()
