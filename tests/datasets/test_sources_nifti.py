"""NIfTI volumes -> HDF5: HU from the header's scaling, exact; slices cut along the
superior-inferior axis whatever the voxel order; z, spacing and orientation recorded."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medssl.datasets.sources import convert_nifti

HU = {"intensity": {"policy": "hu"}, "image_size": None}


def _volume(path: Path, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A volume whose voxel axis 1 runs inferior (S decreasing): stored int16 with
    scl_slope 2 and scl_inter -1024; returns the HU it encodes."""
    raw = np.random.default_rng(seed).integers(0, 1200, shape).astype(np.int16)
    affine = np.array(
        [
            [0.8, 0.0, 0.0, -40.0],  # voxel axis 0 -> right (R)
            [0.0, 0.0, 0.7, -30.0],  # voxel axis 2 -> anterior (A)
            [0.0, -2.5, 0.0, 100.0],  # voxel axis 1 -> inferior (I)
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    image = nib.Nifti1Image(raw, affine)
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, path)
    return raw.astype(np.int32) * 2 - 1024


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("nifti")
    return {
        "root": root,
        "a": _volume(root / "case_a.nii.gz", (12, 6, 10), 1),
        "b": _volume(root / "case_b.nii", (9, 4, 14), 2),
    }


def test_hu_exact_and_axial_slices_in_order(volumes: dict, tmp_path: Path) -> None:
    summary = convert_nifti(volumes["root"], tmp_path / "v.h5", tmp_path / "v.csv", HU)
    assert summary["converted"] == 10 and summary["rejected"] == 0
    with h5py.File(tmp_path / "v.h5") as handle:
        images = handle["images"]
        assert images.dtype == np.int16 and images.shape == (10, 1, 12, 14)  # padded
        meta = handle["meta"]
        assert list(meta["patient_id"].asstr()[:6]) == ["case_a"] * 6
        z = meta["z"][:6]
        assert np.all(np.diff(z) > 0)  # sorted upwards, though the voxels run down
        np.testing.assert_allclose(z, 100.0 - 2.5 * np.arange(6)[::-1])
        for row, k in enumerate(range(5, -1, -1)):
            top, left = meta["pad_offset"][row]
            np.testing.assert_array_equal(
                images[row, 0, top : top + 12, left : left + 10], volumes["a"][:, k, :]
            )
        np.testing.assert_allclose(meta["spacing"][0], [0.8, 0.7, 2.5], rtol=1e-6)
        assert images[0, 0, 0, 0] == -1024  # padding is air
        orientation = json.loads(handle.attrs["volume_orientation"])
        assert orientation["case_a.nii.gz"] == {"axcodes": "RIA", "slice_axis": 1}
        assert list(meta["original_shape"][6]) == [9, 14]


def test_manifest_maps_files_to_patients(volumes: dict, tmp_path: Path) -> None:
    manifest = pd.DataFrame({"file": ["case_a.nii.gz", "case_b.nii"], "patient_id": ["P1", "P1"]})
    convert_nifti(volumes["root"], tmp_path / "m.h5", tmp_path / "m.csv", HU, manifest=manifest)
    with h5py.File(tmp_path / "m.h5") as handle:
        assert set(handle["meta/patient_id"].asstr()[...]) == {"P1"}
        assert handle.attrs["n_series"] == 2
