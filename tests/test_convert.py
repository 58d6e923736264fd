"""``python -m medssl.convert``: standalone defaults, options over settings, exit status."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from medssl import convert
from tests.corpus import make_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_cohort(tmp_path_factory)


def test_standalone_cli_defaults(cohort: dict, tmp_path: Path) -> None:
    out = tmp_path / "cli.h5"
    result = subprocess.run(
        [sys.executable, "-m", "medssl.convert", str(cohort["clean"]), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rejects = pd.read_csv(tmp_path / "cli.rejects.csv")
    assert len(rejects) == 2
    with h5py.File(out) as handle:
        assert handle["images"].dtype == np.int16
        assert handle["images"].shape == (16, 1, 32, 32)
        assert handle["images"].attrs["policy"] == "hu"
    help_text = subprocess.run(
        [sys.executable, "-m", "medssl.convert", "--help"], capture_output=True, text=True
    ).stdout
    for word in ("/meta/source_file", "--gap-policy", "--max-reject-fraction", "rejects.csv"):
        assert word in help_text


def test_options_override_single_settings(cohort: dict, tmp_path: Path) -> None:
    out = tmp_path / "o.h5"
    settings = {"intensity": {"policy": "hu"}, "image_size": 32, "compression": "none"}
    argv = ["--dicom-dir", str(cohort["clean"]), "--out", str(out), "--rejects"]
    argv += [str(tmp_path / "o.csv"), "--settings", json.dumps(settings)]
    argv += ["--policy", "window", "--window=-600,1500", "--window", "40,400"]
    argv += ["--image-size", "16", "--compression", "lzf"]
    assert convert.main(argv) == 0
    with h5py.File(out) as handle:
        images = handle["images"]
        assert images.shape == (16, 2, 16, 16) and images.dtype == np.uint8
        assert images.attrs["compression"] == "lzf"
        assert json.loads(images.attrs["channels"]) == [
            {"window": [-600.0, 1500.0]},
            {"window": [40.0, 400.0]},
        ]
    assert len(pd.read_csv(tmp_path / "o.csv")) == 2


def test_cli_empty_folder_exits_nonzero(tmp_path: Path) -> None:
    empty = tmp_path / "empty_dicom"
    empty.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medssl.convert",
            "--dicom-dir",
            str(empty),
            "--out",
            str(tmp_path / "e.h5"),
            "--rejects",
            str(tmp_path / "e.csv"),
            "--settings",
            "{}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"error: convert: {empty}: no usable images" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "e.h5").exists()


def test_missing_folder_or_output_is_one_error_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        assert convert.main(["--out", str(tmp_path / "x.h5")]) == 1
        assert convert.main([str(tmp_path / "missing"), str(tmp_path / "x.h5")]) == 1
    assert caplog.messages == [
        "error: convert: give SRC_DIR and OUT.h5 (or --dicom-dir and --out)",
        f"error: convert: {tmp_path / 'missing'}: DICOM folder does not exist",
    ]
    with pytest.raises(SystemExit) as usage:
        convert.main(["--gap-policy", "splt"])
    assert usage.value.code == 2  # argparse: not one of the choices
