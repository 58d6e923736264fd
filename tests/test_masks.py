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


def test_preset_masks_cli(tmp_path: Path) -> None:
    from tests.datasets.replicas import montgomery
    from tests.datasets.test_mask_sources import write_image_h5

    facts = montgomery(tmp_path / "release")
    files = sorted(facts["lungs"])
    h5 = write_image_h5(
        tmp_path / "m.h5", files, [Path(f).stem for f in files], 16, [(48, 40)] * 10
    )
    out = tmp_path / "lung.h5"
    argv = ["--data", str(h5), "--format", "preset", "--preset", "montgomery", "--out", str(out)]
    assert masks.main([*argv, "--source", str(tmp_path / "release"), "--structure", "lung"]) == 0
    with h5py.File(out, "r") as handle:
        assert handle["annotated"][...].all() and handle["masks"].shape == (10, 16, 16)
        assert json.loads(handle.attrs["provenance"])["settings"]["preset"] == "montgomery"


def test_converted_preset_masks_follow_their_images_padding(tmp_path: Path) -> None:
    """Montgomery's 48x40 images padded into 24x24: the lungs land where the image pixels are."""
    import numpy as np

    from medssl import convert
    from medssl.datasets.hdf5 import read_meta
    from medssl.datasets.resizing import Geometry, to_stored_grid
    from tests.datasets.replicas import montgomery

    facts = montgomery(tmp_path / "release")
    h5 = tmp_path / "m.h5"
    argv = ["--preset", "montgomery", "--root", str(tmp_path / "release"), "--out", str(h5)]
    argv += ["--rejects", str(tmp_path / "rej.csv"), "--labels-out", str(tmp_path / "m.csv")]
    assert convert.main([*argv, "--settings", '{"image_size": 24}']) == 0
    out = tmp_path / "lung.h5"
    argv = ["--data", str(h5), "--format", "preset", "--preset", "montgomery", "--out", str(out)]
    assert masks.main([*argv, "--source", str(tmp_path / "release"), "--structure", "lung"]) == 0
    meta = read_meta(h5)
    with h5py.File(h5, "r") as handle:
        geometry = {
            k: handle[f"meta/{k}"][...] for k in ("original_shape", "resized_shape", "pad_offset")
        }
    with h5py.File(out, "r") as handle:
        stored = handle["masks"][...]
    for row, file in enumerate(meta["source_file"]):
        place = Geometry.from_meta(geometry, row, (24, 24))
        expected = to_stored_grid(facts["lungs"][file].astype(np.uint8), place, "area")
        np.testing.assert_array_equal(stored[row], expected)
        (top, left), (height, width) = place.offset, place.resized
        assert (height, width) != (24, 24) and stored[row].sum() > 50
        inside = np.zeros((24, 24), bool)
        inside[top : top + height, left : left + width] = True
        assert not stored[row][~inside].any()  # the padding holds no lung
