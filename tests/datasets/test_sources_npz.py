"""MedMNIST-style npz archives -> HDF5: official split kept, one patient per image,
labels table, and errors that name the archive and the key."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from medssl.datasets.sources import ArchiveError, convert_npz

SIZES = {"train": 5, "val": 2, "test": 3}


def _archive(
    path: Path, channels: int = 0, drop: str | None = None, short: str | None = None
) -> dict:
    """A small archive: 8 x 8 uint8 images (or 8 x 8 x 3), labels (N, 1)."""
    rng = np.random.default_rng(5)
    arrays = {}
    for split, n in SIZES.items():
        shape = (n, 8, 8, channels) if channels else (n, 8, 8)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 11, (n - (split == short), 1))
    if drop:
        del arrays[drop]
    np.savez(path, **arrays)
    return arrays


def test_archive_converted_with_its_split_and_labels(tmp_path: Path) -> None:
    arrays = _archive(tmp_path / "organs.npz")
    summary = convert_npz(
        tmp_path / "organs.npz",
        tmp_path / "o.h5",
        tmp_path / "o.csv",
        {"image_size": None},
        labels_out=tmp_path / "labels.csv",
    )
    assert summary["converted"] == 10 and summary["rejected"] == 0
    labels = pd.read_csv(tmp_path / "labels.csv")
    assert list(labels.columns) == ["sop_uid", "patient_id", "official_split", "label"]
    assert list(labels["official_split"]) == ["train"] * 5 + ["val"] * 2 + ["test"] * 3
    assert labels["sop_uid"][1] == "train_000001" and labels["sop_uid"][5] == "val_000000"
    assert (labels["patient_id"] == labels["sop_uid"]).all()  # each image its own patient
    expected = np.concatenate([arrays[f"{s}_labels"][:, 0] for s in SIZES])
    np.testing.assert_array_equal(labels["label"], expected)
    with h5py.File(tmp_path / "o.h5") as handle:
        images = handle["images"]
        assert images.shape == (10, 1, 8, 8) and images.dtype == np.uint8
        np.testing.assert_array_equal(images[5, 0], arrays["val_images"][0])
        assert list(handle["meta/sop_uid"].asstr()[...]) == list(labels["sop_uid"])
        assert handle.attrs["source"] == "npz"


def test_colour_archive_kept_or_grey(tmp_path: Path) -> None:
    arrays = _archive(tmp_path / "derma.npz", channels=3)
    for rgb, channels in (("keep", 3), ("grey", 1)):
        out = tmp_path / f"{rgb}.h5"
        convert_npz(
            tmp_path / "derma.npz", out, tmp_path / "r.csv", {"image_size": None, "rgb": rgb}
        )
        with h5py.File(out) as handle:
            assert handle["images"].shape[1] == channels
            if rgb == "keep":
                np.testing.assert_array_equal(
                    handle["images"][0], arrays["train_images"][0].transpose(2, 0, 1)
                )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ({"drop": "val_labels"}, "missing key 'val_labels'"),
        ({"short": "test"}, "test_labels has shape (2, 1) for 3 images in test_images"),
    ],
)
def test_broken_archive_names_archive_and_key(tmp_path: Path, damage: dict, message: str) -> None:
    _archive(tmp_path / "bad.npz", **damage)
    with pytest.raises(ArchiveError, match=str(tmp_path / "bad.npz")) as err:
        convert_npz(tmp_path / "bad.npz", tmp_path / "b.h5", tmp_path / "b.csv")
    assert message in str(err.value)
    assert not (tmp_path / "b.h5").exists()
