"""``python -m medssl.masks``: the mask file from the command line, and its failures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import pytest

from medssl import masks


def test_synthetic_masks_cli(converted_cohort: dict, tmp_path: Path) -> None:
    out = tmp_path / "lung.h5"
    argv = ["--data", str(converted_cohort["h5"]), "--format", "folder"]
    argv += ["--source", str(converted_cohort["masks_dir"]), "--structure", "lung"]
    assert masks.main([*argv, "--out", str(out)]) == 0
    with h5py.File(out, "r") as handle:
        assert handle["annotated"][...].any()
        assert handle.attrs["structure"] == "lung"
        assert handle.attrs["format"] == "folder"
        provenance = json.loads(handle.attrs["provenance"])
    assert provenance["stage"] == "masks"
    assert provenance["settings"]["structure"] == "lung"


def test_no_annotation_is_one_error_line(
    converted_cohort: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "x.h5"
    argv = ["--data", str(converted_cohort["h5"]), "--format", "folder", "--out", str(out)]
    argv += ["--source", str(converted_cohort["masks_dir"]), "--structure", "spleen"]
    with caplog.at_level(logging.ERROR):
        assert masks.main(argv) == 1
    assert caplog.messages[-1].startswith("error: masks: ")
    assert "spleen" in caplog.messages[-1]
    assert not out.exists()
