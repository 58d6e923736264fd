"""A tiny unlabelled pool in medssl.datasets.hdf5's layout, and the settings and command
line that pre-train on it, for the pre-training tests."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

SETTINGS = {
    "backbone": "resnet_small",
    "epochs": 2,
    "batch_size": 8,
    "lr": 0.05,
    "weight_decay": 1e-4,
    "optimizer": "adamw",
    "warmup_epochs": 1,
    "checkpoint_every": 1,
    "max_samples": None,
    "augment": {"crop_scale": [0.3, 1.0]},
    "simclr": {"temperature": 0.2, "proj_dim": 16},
}
"""A short SimCLR run of the small ResNet (the ``pretrain`` section)."""


def cli_args(data: Path, out: Path, checkpoints: Path, settings: dict) -> list[str]:
    """``python -m medssl.pretrain`` arguments: SimCLR, seed 3, CPU, one thread."""
    return [
        "--method", "simclr", "--data", str(data), "--settings", json.dumps(settings),
        "--seed", "3", "--out", str(out), "--checkpoint-dir", str(checkpoints),
        "--threads", "1", "--device", "cpu",
    ]  # fmt: skip


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
