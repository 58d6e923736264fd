"""Generated inputs of the device check: an unlabelled pool and a labelled cohort.

Both follow :mod:`medssl.datasets.hdf5`'s layout (uint8 slices, model input =
stored / 255, one chunk per slice), written uncompressed so reading them costs
what reading a converted dataset costs, not a codec's time. The labelled
cohort is partitioned and subsampled by medssl itself
(:mod:`medssl.datasets.splits`), so the fine-tune stage reads exactly the
files the workflow would give it.

    python bench/device/data.py --root DIR --n 2048 --size 224
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from medssl.core.files import write_csv
from medssl.datasets.hdf5 import read_meta
from medssl.datasets.splits import make_partition, make_subsets, read_label_table

SLICES_PER_PATIENT = 16
"""Slices per synthetic patient: the partition splits by patient."""

TASK = {"name": "square", "dataset": "device", "column": "square", "type": "binary"}
"""The cohort's one task: is a bright square visible in the slice."""


def write_images(path: Path, stored: np.ndarray) -> None:
    """``stored`` (N, C, H, W) uint8 and per-slice metadata, in the dataset layout."""
    n, channels, height, width = stored.shape
    patients = [f"P{row // SLICES_PER_PATIENT:04d}" for row in range(n)]
    strings = h5py.string_dtype()
    with h5py.File(path, "w") as handle:
        images = handle.create_dataset("images", data=stored, chunks=(1, channels, height, width))
        images.attrs.update(
            {"policy": "window", "scale": 1 / 255, "offset": 0.0, "channels": json.dumps([])}
        )
        meta = handle.create_group("meta")
        meta.create_dataset("patient_id", data=np.array(patients, dtype=object), dtype=strings)
        for name in ("study_uid", "series_uid", "source_file"):
            meta.create_dataset(name, data=np.array(patients, dtype=object), dtype=strings)
        sops = np.array([f"1.2.826.0.1.{row}" for row in range(n)], dtype=object)
        meta.create_dataset("sop_uid", data=sops, dtype=strings)
        meta.create_dataset("slice_index", data=np.arange(n, dtype=np.int32) % SLICES_PER_PATIENT)
        meta.create_dataset("z", data=np.arange(n, dtype=np.float64))


def noise(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth-ish uint8 noise slices (N, 1, size, size)."""
    rng = np.random.default_rng(seed)
    return rng.normal(90, 25, (n, 1, size, size)).clip(0, 255).astype(np.uint8)


def make_pool(path: Path, n: int, size: int, seed: int = 0) -> Path:
    """The unlabelled pre-training pool."""
    write_images(path, noise(n, size, seed))
    return path


def make_cohort(root: Path, n: int, size: int, seed: int = 1) -> dict[str, Path]:
    """HDF5, label table, partition and one seed's subsets of :data:`TASK`."""
    rng = np.random.default_rng(seed)
    stored = noise(n, size, seed)
    labels = rng.random(n) < 0.4
    side = max(size // 6, 2)
    for row in np.flatnonzero(labels):
        y, x = rng.integers(0, size - side, 2)
        stored[row, :, y : y + side, x : x + side] = 230
    h5 = root / "cohort.h5"
    write_images(h5, stored)
    meta = read_meta(h5)
    label_csv = root / "cohort.labels.csv"
    pd.DataFrame(
        {"patient_id": meta["patient_id"], "sop_uid": meta["sop_uid"], "square": labels.astype(int)}
    ).to_csv(label_csv, index=False)
    table = read_label_table(label_csv, "sop_uid", "square")
    partition = make_partition(meta, table, TASK, str(h5), str(label_csv))
    write_csv(root / "partition.csv", partition)
    write_csv(root / "seed0.csv", make_subsets(partition, seed=0))
    return {
        "h5": h5,
        "partition": root / "partition.csv",
        "subsets": root / "seed0.csv",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--n", type=int, default=2048, help="slices of the pool")
    parser.add_argument("--cohort", type=int, default=512, help="slices of the labelled cohort")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    make_pool(args.root / "pool.h5", args.n, args.size)
    paths = make_cohort(args.root, args.cohort, args.size)
    print(json.dumps({"pool": str(args.root / "pool.h5"), **{k: str(v) for k, v in paths.items()}}))


if __name__ == "__main__":
    main()
