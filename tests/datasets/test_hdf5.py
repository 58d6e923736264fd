"""Training readers of the HDF5 contract: per-slice, per-batch and through DataLoader workers."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from medssl.datasets import conversion as convert
from medssl.datasets import hdf5 as data
from medssl.datasets import synthetic as synth

COHORT = {"patients": 2, "series_per_patient": 1, "slices": 6, "matrix": 32, "seed": 11}


@pytest.fixture(scope="module")
def h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    synth.synthesize(root / "dicom", root / "labels.csv", COHORT)
    out = root / "ds.h5"
    convert.convert(root / "dicom", out, root / "rejects.csv", {"image_size": None})
    return out


def test_slice_reader_reads_rows_in_the_order_given(h5: Path) -> None:
    with h5py.File(h5) as handle:
        stored = handle["images"][...]
    with data.open_h5(h5, random_access=True) as handle:
        reader = data.SliceReader(handle)
        rows = np.array([7, 2, 9, 2, 0])
        np.testing.assert_array_equal(reader.read_rows(rows), stored[rows])
        out = np.empty(reader.shape, reader.dtype)
        np.testing.assert_array_equal(reader.read(5, out), stored[5])


def test_batch_dataset_matches_per_slice_model_input(h5: Path, one_thread: None) -> None:
    indices = np.array([10, 3, 4, 8])
    labels = np.array([1, 0, 1, 1])
    batches = data.SliceBatchDataset(h5, indices, labels)
    stored, got = batches[[3, 0, 2]]
    assert stored.dtype == torch.uint8  # the window policy's stored dtype, not float
    assert got.tolist() == [1, 1, 1]
    expected = data.load_images(h5, indices[[3, 0, 2]])
    model_input = data.to_model_input(stored, batches.scale, batches.offset)
    torch.testing.assert_close(model_input, expected, rtol=0, atol=0)
    single = data.SliceDataset(h5, indices, labels)
    image, label = single[2]
    torch.testing.assert_close(image, expected[2], rtol=0, atol=0)
    assert int(label) == 1


def test_batch_loader_visits_every_sample_once_per_epoch(h5: Path, one_thread: None) -> None:
    indices = np.arange(1, 12)
    dataset = data.SliceBatchDataset(h5, indices, labels=indices)
    loader = data.batch_loader(dataset, batch_size=4, num_workers=1, seed=3)
    for _ in range(2):  # persistent workers keep their open file between epochs
        seen = torch.cat([labels for _, labels in loader])
        assert sorted(seen.tolist()) == indices.tolist()
        assert seen.tolist() != indices.tolist()  # shuffled
    ordered = data.batch_loader(dataset, batch_size=5, shuffle=False)
    assert [len(batch) for batch, _ in ordered] == [5, 5, 1]


@pytest.mark.parametrize("compression", ["lzf", "none", "blosc"])
def test_slice_reader_any_filter(h5: Path, tmp_path: Path, compression: str) -> None:
    """Blosc takes the direct-chunk path, other filters HDF5's pipeline: same slices."""
    with h5py.File(h5) as handle:
        stored = handle["images"][...]
    copy = tmp_path / f"{compression}.h5"
    with h5py.File(copy, "w") as handle:
        handle.create_dataset(
            "images", data=stored, chunks=(1, *stored.shape[1:]), **convert.COMPRESSION[compression]
        )
        handle.create_group("meta")
    with data.open_h5(copy, random_access=True) as handle:
        reader = data.SliceReader(handle)
        assert (reader._blosc is not None) == (compression == "blosc")
        np.testing.assert_array_equal(reader.read_rows(np.array([4, 1, 8])), stored[[4, 1, 8]])
