"""A tiny unlabelled pool in medssl.datasets.hdf5's layout, for pre-training tests."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np


def make_h5(path: Path, n: int = 32, channels: int = 1, size: int = 32, seed: int = 0) -> Path:
    """A tiny dataset in medssl.datasets.hdf5's layout: uint8 slices, model input = stored / 255."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as handle:
        stored = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
        images = handle.create_dataset("images", data=stored, chunks=(1, channels, size, size))
        images.attrs["policy"] = "window"
        images.attrs["scale"] = 1 / 255
        images.attrs["offset"] = 0.0
        images.attrs["channels"] = json.dumps(["window"] * channels)
        meta = handle.create_group("meta")
        strings = h5py.string_dtype()
        for name in ("patient_id", "study_uid", "series_uid", "sop_uid", "source_file"):
            meta.create_dataset(name, data=[f"{name}{i // 4}" for i in range(n)], dtype=strings)
        meta.create_dataset("slice_index", data=np.arange(n, dtype=np.int32) % 4)
        meta.create_dataset("z", data=np.arange(n, dtype=np.float64))
    return path
