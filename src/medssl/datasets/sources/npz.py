"""A MedMNIST-style ``.npz`` archive -> one HDF5 dataset and its labels table.

The archive holds ``train_images``, ``train_labels``, ``val_images``,
``val_labels``, ``test_images`` and ``test_labels``: images (N, H, W) or
(N, H, W, 3) uint8, labels (N, 1) or (N, K). The archive's split is kept in
the labels table's ``official_split`` column (train/val/test), and each image
gets the id ``<split>_<index>`` (``train_000123``).

MedMNIST ships no patient ids, so **each image is its own patient**
(patient_id = image id): a patient-level split is then an image-level one,
which can put slices of one patient in both training and test (the log says
so). The archive is read in this one process: it is already decoded, so
worker processes would only copy it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from medssl.datasets.conversion.driver import SLICES_PER_TASK, Accounting
from medssl.datasets.conversion.intensity import Intensity, ScaleIntensity
from medssl.datasets.conversion.layout import META_COLUMNS
from medssl.datasets.conversion.pixels import SeriesResult, geometry_meta, store_slice
from medssl.datasets.conversion.settings import resolve_settings
from medssl.datasets.resizing import Grid
from medssl.datasets.sources.common import finish, started_now
from medssl.dicom.reading import Rejection

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class ArchiveError(ValueError):
    """An archive without the MedMNIST keys, or with images and labels that disagree."""


def read_archive(path: Path) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Images per split and the manifest table (image_id, patient_id, official_split,
    label columns ``label`` or ``label_0`` ... ``label_{K-1}``)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ArchiveError(f"{path}: cannot read as an npz archive ({err})") from err
    images: dict[str, np.ndarray] = {}
    rows: list[pd.DataFrame] = []
    with archive:
        for split in SPLITS:
            image_key, label_key = f"{split}_images", f"{split}_labels"
            for key in (image_key, label_key):
                if key not in archive.files:
                    raise ArchiveError(
                        f"{path}: missing key {key!r} (has {', '.join(sorted(archive.files))})"
                    )
            pixels, labels = archive[image_key], archive[label_key]
            _check_arrays(path, split, pixels, labels)
            labels = labels.reshape(len(labels), -1)
            images[split] = pixels
            ids = [f"{split}_{k:06d}" for k in range(len(pixels))]
            names = (
                ["label"]
                if labels.shape[1] == 1
                else [f"label_{j}" for j in range(labels.shape[1])]
            )
            frame = pd.DataFrame(labels, columns=names)
            frame.insert(0, "official_split", split)
            frame.insert(0, "patient_id", ids)
            frame.insert(0, "image_id", ids)
            rows.append(frame)
    return images, pd.concat(rows, ignore_index=True)


def _check_arrays(path: Path, split: str, pixels: np.ndarray, labels: np.ndarray) -> None:
    """Shapes and dtype of one split; the error names the archive and the key."""
    if pixels.ndim not in (3, 4) or (pixels.ndim == 4 and pixels.shape[3] != 3):
        raise ArchiveError(
            f"{path}: {split}_images has shape {pixels.shape}, expected (N, H, W) or (N, H, W, 3)"
        )
    if pixels.dtype != np.uint8:
        raise ArchiveError(f"{path}: {split}_images has dtype {pixels.dtype}, expected uint8")
    if labels.ndim not in (1, 2) or len(labels) != len(pixels):
        raise ArchiveError(
            f"{path}: {split}_labels has shape {labels.shape} for {len(pixels)} images in "
            f"{split}_images (expected ({len(pixels)}, 1) or ({len(pixels)}, K))"
        )


def _grey(image: np.ndarray, rgb: str) -> np.ndarray:
    """One archive image as (H, W) or (3, H, W) under the ``rgb`` policy (Pillow's luminance)."""
    if image.ndim == 2:
        return np.repeat(image[None], 3, axis=0) if rgb == "keep" else image
    if rgb == "keep":
        return np.ascontiguousarray(image.transpose(2, 0, 1))
    return np.asarray(Image.fromarray(image, "RGB").convert("L"))


def convert_npz(
    archive: str | os.PathLike[str],
    out_h5: str | os.PathLike[str],
    rejects_csv: str | os.PathLike[str],
    settings: dict[str, Any] | None = None,
    labels_out: str | os.PathLike[str] | None = None,
    extra_rejects: list[Rejection] | None = None,
) -> dict[str, Any]:
    """Convert a MedMNIST-style archive; write the HDF5 dataset, the rejects CSV
    (empty unless ``extra_rejects``, a preset's unmatched rows, are given) and,
    with ``labels_out``, the labels table; return the summary."""
    cfg = resolve_settings(settings, source="npz")
    path = Path(archive)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: npz archive does not exist")
    started = started_now()
    images, table = read_archive(path)
    log.info(
        "%s: %s images; MedMNIST has no patient ids, so each image is its own patient",
        path,
        ", ".join(f"{len(images[s])} {s}" for s in SPLITS),
    )
    base = Intensity.from_settings(cfg["intensity"])
    assert isinstance(base, ScaleIntensity)
    intensity = dataclasses.replace(base, planes=3 if cfg["rgb"] == "keep" else 1)
    shapes = [(arr.shape[1:3], None, len(arr)) for arr in images.values() if len(arr)]
    grid = Grid.plan(shapes, cfg["geometry"], cfg["image_size"], None, cfg["fit"])
    if cfg["geometry"] == "reject" and cfg["image_size"] is None and len(shapes) > 1:
        sizes = {tuple(s) for s, _, _ in shapes}
        if len(sizes) > 1:
            raise ArchiveError(f"{path}: splits have image sizes {sorted(sizes)}; use geometry pad")
    results = _results(images, path.name, grid, intensity, cfg["rgb"])
    extra = list(extra_rejects or [])
    found = Accounting(1, len(table) + len(extra), extra, {}, "npz")
    return finish(
        path, out_h5, rejects_csv, cfg, intensity, grid, results, found, started, table, labels_out
    )


def _results(images: dict[str, np.ndarray], name: str, grid: Grid, intensity: Intensity, rgb: str):  # noqa: ANN202 - a generator of SeriesResult
    """The archive's images in split order, :data:`SLICES_PER_TASK` at a time."""
    for split in SPLITS:
        pixels = images[split]
        for start in range(0, len(pixels), SLICES_PER_TASK):
            meta: dict[str, list[Any]] = {n: [] for n in META_COLUMNS}
            rows = []
            for k in range(start, min(start + SLICES_PER_TASK, len(pixels))):
                image = _grey(pixels[k], rgb)
                geometry = grid.place(pixels.shape[1:3], None)
                rows.append(store_slice(image, geometry, intensity))
                image_id = f"{split}_{k:06d}"
                for column, value in (
                    ("patient_id", image_id),
                    ("study_uid", image_id),
                    ("series_uid", image_id),
                    ("sop_uid", image_id),
                    ("source_file", f"{name}:{split}_images[{k}]"),
                    ("slice_index", -1),
                    ("z", float("nan")),
                    ("spacing", (float("nan"),) * 3),
                ):
                    meta[column].append(value)
                geometry_meta(meta, geometry)
            yield SeriesResult(np.stack(rows), meta, [])
