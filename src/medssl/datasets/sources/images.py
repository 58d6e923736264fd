"""Image files (PNG, JPEG, TIFF, GIF, BMP) listed by a manifest -> one HDF5 dataset.

Decoding is Pillow's. Two passes, like the DICOM path: a header pass
(:func:`probe`: size after EXIF orientation, bit depth; no pixels decoded)
fixes the dataset's grid and stored dtype before any pixel is read, then the
pixel pass decodes, resamples and places the images in worker processes.
Grey images keep their bit depth (a 16-bit PNG is stored as uint16, not cut
to 8 bits); colour images follow the ``rgb`` setting: ``grey`` stores
Pillow's ITU-R 601-2 luminance, ``keep`` the three channels (grey images of
such a dataset are repeated to three channels). Stored values keep their
integers; the ``scale`` policy's attributes make ``load_images`` return
value / (2**bits - 1).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from medssl.datasets.conversion.chunks import encode_chunks
from medssl.datasets.conversion.driver import SLICES_PER_TASK, Accounting
from medssl.datasets.conversion.intensity import Intensity, ScaleIntensity
from medssl.datasets.conversion.layout import META_COLUMNS
from medssl.datasets.conversion.pixels import (
    SeriesResult,
    geometry_meta,
    read_or_reject,
    store_slice,
)
from medssl.datasets.conversion.settings import resolve_settings
from medssl.datasets.resizing import Geometry, Grid
from medssl.datasets.sources.common import finish, make_pool, ordered_results, started_now
from medssl.datasets.sources.manifest import ImageTask, check_rows, load_manifest, scan_folder
from medssl.dicom.reading import Rejection

log = logging.getLogger(__name__)

#: Pillow modes of 16-bit grey (``I`` is how some files and Pillow versions give them).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: Uncompressed bytes of one pool task at most: 64 slices of 512 x 512 uint16, or
#: 16 of 1024 x 1024; a worker holds a task's slices twice (rows and stack).
TASK_BYTES = 32 * 2**20
#: EXIF orientations that swap rows and columns (transpose and the 90-degree turns).
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageInfo:
    """What the header pass learns of one file: its shape once upright, its bit depth."""

    shape: tuple[int, int]
    bits: int


def probe(path: Path) -> ImageInfo | str:
    """Shape (after EXIF orientation) and bit depth from the header, or a reject reason."""
    try:
        if path.stat().st_size == 0:
            return "zero-size file"
        with Image.open(path) as image:
            width, height = image.size
            mode = image.mode
            orientation = _orientation(image)
    except Exception as err:  # Pillow raises many types for files it cannot identify
        return f"unreadable or truncated file ({type(err).__name__}: {err})"
    if mode == "F":
        return "unsupported pixel mode F (floating-point image)"
    if orientation in SWAPPING_ORIENTATIONS:
        width, height = height, width
    return ImageInfo((height, width), 16 if mode in SIXTEEN_BIT_MODES else 8)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag from the header alone.

    Pillow's ``getexif`` on a PNG decodes the whole image when the header holds
    no eXIf chunk (it may follow the pixel data), which made the header pass
    cost a quarter of the conversion; a PNG's header chunk is in ``info`` if
    present. An orientation found only after the pixels is still applied by
    :func:`decode`, and the row's geometry follows the decoded shape.
    """
    if image.format == "PNG":
        raw = image.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(EXIF_ORIENTATION, 1))
    return int(image.getexif().get(EXIF_ORIENTATION, 1))


def decode(path: Path, rgb: str) -> np.ndarray:
    """The upright pixels: (H, W) uint8/uint16 grey, or (3, H, W) under ``rgb: keep``.

    Raises ``ValueError`` for 32-bit values beyond 16 bits and Pillow's errors
    for damaged files (the caller turns both into rejects).
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image)
        if grey.dtype != np.uint16:
            if grey.min() < 0 or grey.max() > 65535:
                raise ValueError(f"pixel values outside 0..65535 (mode {mode})")
            grey = grey.astype(np.uint16)
    elif mode in ("L", "1", "LA"):
        grey = np.asarray(image.convert("L"))
    else:  # colour, palette, CMYK ...: through RGB, so a palette's colours count
        colour = image.convert("RGB")
        if rgb == "grey":
            return np.asarray(colour.convert("L"))
        return np.ascontiguousarray(np.asarray(colour).transpose(2, 0, 1))
    if rgb == "keep":
        return np.repeat(grey[None], 3, axis=0)
    return grey


def convert_part(
    tasks: list[ImageTask],
    grid: Grid,
    intensity: Intensity,
    rgb: str,
    compression: str | None,
) -> SeriesResult:
    """Decode, resample and place a few images (one pool task); rejects with reasons."""
    meta: dict[str, list[Any]] = {name: [] for name in META_COLUMNS}
    rejected: list[Rejection] = []
    # Filled in place: stacking a list of rows cost a copy of every slice.
    images = np.empty((len(tasks), intensity.n_channels, *grid.stored), intensity.numpy_dtype)
    n = 0
    for task in tasks:
        pixels = read_or_reject(
            lambda t=task: decode(t.path, rgb), task.file, task.study_id, rejected
        )
        if pixels is None:
            continue
        geometry = grid.place(pixels.shape[-2:], None)
        images[n] = store_slice(pixels, geometry, intensity)
        n += 1
        _row_meta(meta, task, geometry)
    images = images[:n]
    if compression is None:
        return SeriesResult(images, meta, rejected)
    return SeriesResult(images[:0], meta, rejected, encode_chunks(images, compression))


def _row_meta(meta: dict[str, list[Any]], task: ImageTask, geometry: Geometry) -> None:
    """One image's /meta row: no position or pixel spacing is known (NaN)."""
    meta["patient_id"].append(task.patient_id)
    meta["study_uid"].append(task.study_id)
    meta["series_uid"].append(task.study_id)
    meta["sop_uid"].append(task.image_id)
    meta["source_file"].append(task.file)
    meta["slice_index"].append(-1)
    meta["z"].append(float("nan"))
    meta["spacing"].append((float("nan"),) * 3)
    geometry_meta(meta, geometry)


def convert_images(
    root: str | os.PathLike[str],
    manifest: pd.DataFrame | str | os.PathLike[str],
    out_h5: str | os.PathLike[str],
    rejects_csv: str | os.PathLike[str],
    settings: dict[str, Any] | None = None,
    threads: int = 1,
    labels_out: str | os.PathLike[str] | None = None,
    scan: bool = False,
    extra_rejects: list[Rejection] | None = None,
) -> dict[str, Any]:
    """Convert the image files a manifest lists; write the HDF5 dataset, the rejects
    CSV and (with ``labels_out``) the labels table; return the summary.

    ``scan`` also rejects image files under ``root`` that no manifest row lists.
    ``extra_rejects`` (a preset's unmatched rows) join the rejects CSV and the
    accounting as images seen.
    """
    cfg = resolve_settings(settings, source="images")
    folder = Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder does not exist")
    started = started_now()
    table = load_manifest(manifest)
    tasks, rejected = check_rows(table, folder)
    rejected = list(extra_rejects or []) + rejected
    # Files, not rows: two rows may name one file.
    n_files = len({f for f in table["file"] if f and (folder / f).is_file()})
    n_seen = len(table) + len(extra_rejects or [])
    if scan:
        n_other, unlisted = scan_folder(folder, table["file"])
        n_files += n_other
        n_seen += len(unlisted)
        rejected.extend(unlisted)
        log.info(
            "folder scan: %d files not in the manifest, %d of them images", n_other, len(unlisted)
        )
    else:
        log.info("no folder scan: image files that the manifest does not list are not counted")

    pool = make_pool(threads)
    try:
        infos = _probe_all(tasks, pool)
        good = [(t, i) for t, i in zip(tasks, infos, strict=True) if isinstance(i, ImageInfo)]
        rejected.extend(
            Rejection(t.file, t.study_id, i)
            for t, i in zip(tasks, infos, strict=True)
            if isinstance(i, str)
        )
        intensity, grid = _dataset_grid(cfg, [i for _, i in good])
        if cfg["geometry"] == "reject" and cfg["image_size"] is None:
            good = _keep_grid_shape(good, grid, rejected)
        slice_bytes = intensity.n_channels * grid.stored[0] * grid.stored[1] * (intensity.bits // 8)
        per_task = max(1, min(SLICES_PER_TASK, TASK_BYTES // slice_bytes))
        parts = [good[k : k + per_task] for k in range(0, len(good), per_task)]
        work = [[t for t, _ in p] for p in parts]
        compression = cfg["compression"] if pool is not None else None
        results = ordered_results(
            convert_part, work, (grid, intensity, cfg["rgb"], compression), pool
        )
        found = Accounting(n_files, n_seen, rejected, {}, "images")
        return finish(
            folder,
            out_h5,
            rejects_csv,
            cfg,
            intensity,
            grid,
            results,
            found,
            started,
            table,
            labels_out,
        )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _keep_grid_shape(
    good: list[tuple[ImageTask, ImageInfo]], grid: Grid, rejected: list[Rejection]
) -> list[tuple[ImageTask, ImageInfo]]:
    """Under ``geometry: reject`` at native size, the images of the most common shape;
    the others are rejected with the DICOM path's reason."""
    kept = []
    height, width = grid.stored
    for task, info in good:
        if info.shape == grid.stored:
            kept.append((task, info))
            continue
        reason = (
            f"shape {info.shape[0]}x{info.shape[1]} differs from dataset shape "
            f"{height}x{width} (image_size is null, so sizes must match)"
        )
        rejected.append(Rejection(task.file, task.study_id, reason))
    return kept


def _probe_all(tasks: list[ImageTask], pool: Any) -> list[ImageInfo | str]:
    """The header pass, in parallel when a pool is given."""
    paths = [t.path for t in tasks]
    if pool is None:
        return [probe(p) for p in paths]
    chunk = max(1, min(256, len(paths) // (4 * pool._max_workers or 1)))  # noqa: SLF001
    return list(pool.map(probe, paths, chunksize=chunk))


def _dataset_grid(cfg: dict[str, Any], infos: list[ImageInfo]) -> tuple[ScaleIntensity, Grid]:
    """The stored dtype (16 bits when any image has them), channels and grid."""
    base = Intensity.from_settings(cfg["intensity"])
    assert isinstance(base, ScaleIntensity)
    bits = 16 if any(i.bits == 16 for i in infos) else 8
    intensity = dataclasses.replace(base, bits=bits, planes=3 if cfg["rgb"] == "keep" else 1)
    grid = Grid.plan(
        ((i.shape, None, 1) for i in infos), cfg["geometry"], cfg["image_size"], None, cfg["fit"]
    )
    return intensity, grid
