"""NIfTI volumes (``.nii``, ``.nii.gz``) -> one HDF5 dataset of 2-D slices in HU.

nibabel reads each volume; its ``dataobj`` applies the header's
``scl_slope``/``scl_inter``, so the values are HU as the file defines them
(kept as integers when every value is one, so HU stay exact). A volume is cut
along the voxel axis closest to the patient's superior-inferior axis
(:func:`nibabel.orientations.aff2axcodes`), whatever order the voxels are
stored in; the in-plane axes keep their stored order, and the axis codes of
each volume are recorded in the root attribute ``volume_orientation``. Slices
are sorted along the slice normal; ``z`` is each slice's position along it
(from the affine) and the spacing comes from the zooms.

One file is one patient (patient_id = the file name without ``.nii``/``.nii.gz``)
unless a manifest maps ``file`` to ``patient_id``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medssl.datasets.conversion.chunks import encode_chunks
from medssl.datasets.conversion.driver import Accounting
from medssl.datasets.conversion.intensity import Intensity
from medssl.datasets.conversion.layout import META_COLUMNS
from medssl.datasets.conversion.pixels import SeriesResult, geometry_meta, store_slice
from medssl.datasets.conversion.settings import resolve_settings
from medssl.datasets.resizing import Grid
from medssl.datasets.sources.common import finish, make_pool, ordered_results, started_now
from medssl.datasets.sources.manifest import load_manifest
from medssl.dicom.reading import Rejection

log = logging.getLogger(__name__)

SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Volume:
    """One NIfTI file from its header: where to cut it and what each slice is."""

    path: Path
    file: str  # relative to the root
    patient_id: str
    slice_axis: int
    axcodes: str
    shape: tuple[int, int]  # in-plane (rows, columns)
    spacing: tuple[float, float, float]  # rows, columns, slice (mm)
    n_slices: int


def stem(name: str) -> str:
    """The file name without ``.nii.gz`` or ``.nii``."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_volumes(root: Path) -> tuple[list[Path], int]:
    """The NIfTI files under ``root`` (sorted) and the number of all files."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [p for p in files if p.name.endswith(SUFFIXES)], len(files)


def read_volume_header(path: Path, root: Path, patient_id: str) -> Volume | Rejection:
    """The header of one volume; a file nibabel cannot read is a reject."""
    import nibabel as nib

    rel = path.relative_to(root).as_posix()
    try:
        image = nib.load(path)
        shape = image.shape
    except Exception as err:  # nibabel raises many types for damaged files
        return Rejection(rel, stem(path.name), f"unreadable NIfTI ({type(err).__name__}: {err})")
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        return Rejection(rel, stem(path.name), f"not a 3-D volume (shape {shape})")
    codes = nib.orientations.aff2axcodes(image.affine)
    axis = next(k for k, code in enumerate(codes) if code in ("S", "I"))
    plane = [k for k in range(3) if k != axis]
    zooms = image.header.get_zooms()
    return Volume(
        path,
        rel,
        patient_id,
        axis,
        "".join(codes),
        (int(shape[plane[0]]), int(shape[plane[1]])),
        (float(zooms[plane[0]]), float(zooms[plane[1]]), float(zooms[axis])),
        int(shape[axis]),
    )


def volume_hu(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The volume's values with the header's scaling, and its affine.

    Integer when every scaled value is an integer (exact HU), else float32.
    """
    import nibabel as nib

    image = nib.load(path)
    values = np.asarray(image.dataobj, dtype=np.float64)
    if values.ndim == 4:
        values = values[..., 0]
    if np.all(np.isfinite(values)) and np.array_equal(values, np.rint(values)):
        return values.astype(np.int32), image.affine
    return values.astype(np.float32), image.affine


def slice_positions(affine: np.ndarray, axis: int, n_slices: int) -> np.ndarray:
    """Position of each slice along its normal (mm): the voxel-to-world columns give
    the slice step; the normal is the cross product of the in-plane directions."""
    plane = [k for k in range(3) if k != axis]
    normal = np.cross(affine[:3, plane[0]], affine[:3, plane[1]])
    normal /= np.linalg.norm(normal)
    if np.dot(normal, affine[:3, axis]) < 0:
        normal = -normal
    # Superior is +z in RAS+ world coordinates: positions increase upwards.
    if normal[2] < 0:
        normal = -normal
    index = np.zeros((n_slices, 4))
    index[:, axis] = np.arange(n_slices)
    index[:, 3] = 1
    return (index @ affine.T)[:, :3] @ normal


def convert_volume(
    volume: Volume, grid: Grid, intensity: Intensity, compression: str | None
) -> SeriesResult:
    """One volume's slices in order along the normal (a pool task)."""
    try:
        hu, affine = volume_hu(volume.path)
    except Exception as err:  # I/O or decompression failures of every kind
        reason = f"unreadable or truncated NIfTI ({type(err).__name__}: {err})"
        return SeriesResult(
            np.empty((0, intensity.n_channels, *grid.stored), intensity.numpy_dtype),
            {n: [] for n in META_COLUMNS},
            # One reject per slice: the header pass counted the slices as images.
            [
                Rejection(f"{volume.file}#{k}", stem(volume.path.name), reason)
                for k in range(volume.n_slices)
            ],
        )
    slices = np.moveaxis(hu, volume.slice_axis, 0)
    z = slice_positions(affine, volume.slice_axis, volume.n_slices)
    order = np.argsort(z, kind="stable")
    series = stem(volume.path.name)
    meta: dict[str, list[Any]] = {n: [] for n in META_COLUMNS}
    rows = []
    for k in order:
        geometry = grid.place(volume.shape, volume.spacing[:2])
        rows.append(store_slice(slices[k], geometry, intensity))
        for column, value in (
            ("patient_id", volume.patient_id),
            ("study_uid", series),
            ("series_uid", series),
            ("sop_uid", f"{series}#{int(k)}"),
            ("source_file", volume.file),
            ("slice_index", -1),
            ("z", float(z[k])),
            (
                "spacing",
                (
                    volume.spacing[0] / geometry.scale[0],
                    volume.spacing[1] / geometry.scale[1],
                    float(np.median(np.diff(np.sort(z)))) if len(z) > 1 else volume.spacing[2],
                ),
            ),
        ):
            meta[column].append(value)
        geometry_meta(meta, geometry)
    images = np.stack(rows)
    if compression is None:
        return SeriesResult(images, meta, [])
    return SeriesResult(images[:0], meta, [], encode_chunks(images, compression))


def patient_map(manifest: pd.DataFrame | str | os.PathLike[str] | None) -> dict[str, str]:
    """``file`` -> ``patient_id`` from a manifest, or nothing (one patient per file)."""
    if manifest is None:
        return {}
    table = load_manifest(manifest)
    return dict(zip(table["file"], table["patient_id"], strict=True))


def convert_nifti(
    root: str | os.PathLike[str],
    out_h5: str | os.PathLike[str],
    rejects_csv: str | os.PathLike[str],
    settings: dict[str, Any] | None = None,
    threads: int = 1,
    manifest: pd.DataFrame | str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Convert the NIfTI volumes under ``root`` (a folder, or one file); write the HDF5
    dataset and the rejects CSV; return the summary."""
    cfg = resolve_settings(settings, source="nifti")
    intensity = Intensity.from_settings(cfg["intensity"])
    start = Path(root)
    if not start.exists():
        raise FileNotFoundError(f"{start}: NIfTI folder or file does not exist")
    started = started_now()
    folder = start if start.is_dir() else start.parent
    paths, n_files = find_volumes(folder) if start.is_dir() else ([start], 1)
    patients = patient_map(manifest)
    rejected: list[Rejection] = []
    volumes: list[Volume] = []
    for path in paths:
        rel = path.relative_to(folder).as_posix()
        header = read_volume_header(path, folder, patients.get(rel, stem(path.name)))
        if isinstance(header, Rejection):
            rejected.append(header)
        else:
            volumes.append(header)
    n_seen = len(rejected) + sum(v.n_slices for v in volumes)
    if n_files > len(paths):
        log.info("%s: %d files that are not NIfTI ignored", folder, n_files - len(paths))
    grid = Grid.plan(
        ((v.shape, v.spacing[:2], v.n_slices) for v in volumes),
        cfg["geometry"],
        cfg["image_size"],
        cfg["target_spacing"],
        cfg["fit"],
    )
    if cfg["geometry"] == "reject" and cfg["image_size"] is None:
        volumes = _keep_grid_shape(volumes, grid, rejected)
    volumes.sort(key=lambda v: (v.patient_id, v.file))
    pool = make_pool(threads)
    try:
        compression = cfg["compression"] if pool is not None else None
        results = ordered_results(convert_volume, volumes, (grid, intensity, compression), pool)
        orientation = {v.file: {"axcodes": v.axcodes, "slice_axis": v.slice_axis} for v in volumes}
        found = Accounting(
            n_files, n_seen, rejected, {}, "nifti", {"volume_orientation": json.dumps(orientation)}
        )
        return finish(folder, out_h5, rejects_csv, cfg, intensity, grid, results, found, started)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _keep_grid_shape(volumes: list[Volume], grid: Grid, rejected: list[Rejection]) -> list[Volume]:
    """Under ``geometry: reject`` at native size, the volumes of the grid's shape; every
    slice of the others is a reject (one row per slice, so the images add up)."""
    kept = []
    for volume in volumes:
        if volume.shape == grid.stored:
            kept.append(volume)
            continue
        reason = (
            f"shape {volume.shape[0]}x{volume.shape[1]} differs from dataset shape "
            f"{grid.stored[0]}x{grid.stored[1]} (image_size is null, so sizes must match)"
        )
        rejected.extend(
            Rejection(f"{volume.file}#{k}", stem(volume.path.name), reason)
            for k in range(volume.n_slices)
        )
    return kept
