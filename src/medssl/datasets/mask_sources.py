"""Segmentation masks attached to the converted slices: DICOM-SEG, RTSTRUCT or an image folder.

Run as ``python -m medssl.masks`` (:mod:`medssl.masks`). The converted HDF5
is not touched; the masks go to their own file, row ``i`` of which belongs
to row ``i`` of the dataset::

    /masks      (N, H, W) uint8 0/1, one chunk per slice, the images' H x W
    /annotated  (N,) bool: the slice has an annotation (possibly empty)
    root attrs: provenance (JSON), format, structure, source

Masks attach to slices by SOP Instance UID, the key every format carries (or,
for a preset's image files, by the converted ``source_file``), and take the
path their image took to the stored grid (:func:`stored_mask`: the row's
recorded geometry, area-averaging, then >= 0.5), so mask pixels sit where the
image pixels are.

Readers, one per format (:data:`READERS`):

* ``seg``: DICOM Segmentation objects (a file or a folder of them); the
  segment whose SegmentLabel is ``structure``; each frame names its source
  image in DerivationImageSequence / SourceImageSequence. Fractional SEGs are
  thresholded at half their maximum.
* ``rtstruct``: RT Structure Sets; the ROI named ``structure``; each closed
  planar contour is rasterised on the grid of its slice, found by the
  contour's ContourImageSequence or else by the slice plane the contour lies
  in (ImagePositionPatient, ImageOrientationPatient, PixelSpacing of the
  referenced images, read from the DICOM folder).
* ``rle``: SIIM-ACR's ``train-rle.csv`` (``source``: the file or the folder
  holding it), rows keyed by SOP Instance UID (``ImageId``); the relative
  run-length code of :mod:`medssl.datasets.presets.rle`, rows of one image
  joined, ``-1`` an annotated empty image.
* ``preset``: the mask files of a dataset preset (``source``: the release
  root, ``preset``: its name), e.g. Montgomery's left and right lung masks
  joined, DRIVE's vessel or field-of-view GIFs; matched to rows by the
  manifest's ``file`` (the HDF5 ``source_file``) or else by SOP UID.
* ``folder``: ``<source>/<structure>/<SOPInstanceUID>.png`` or
  ``<source>/<structure>/<SeriesInstanceUID>/<slice_index>.png`` (the
  converted slice order); any non-zero pixel is foreground.

SEG and RTSTRUCT annotate whole series: a slice of an annotated series with no
frame or contour is annotated background. A folder annotates the slices that
have a file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pydicom
from PIL import Image

from medssl.core.files import atomic_path
from medssl.core.registry import Registry
from medssl.datasets import resizing
from medssl.datasets.hdf5 import image_shape, read_meta
from medssl.datasets.maskfile import ANNOTATED, MASKS, MaskError, load_masks, mask_labels
from medssl.datasets.resizing import resize
from medssl.dicom.reading import iter_files, read_dataset

log = logging.getLogger(__name__)

__all__ = ["READERS", "MaskError", "build_masks", "load_masks", "mask_labels", "write_masks"]

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"


def _base_series(uid: str) -> str:
    """The DICOM SeriesInstanceUID of a converted series (gap splits add ``#k``)."""
    return uid.split("#", 1)[0]


@dataclass
class Slices:
    """The converted slices a reader attaches masks to, found by SOP UID or by series."""

    meta: pd.DataFrame
    dicom_dir: Path | None
    _geometry: dict[int, dict] = field(default_factory=dict)
    preset: str | None = None
    native_shapes: np.ndarray | None = None  # (N, 2) /meta/original_shape, when recorded

    def __post_init__(self) -> None:
        self.row_of_sop = dict(zip(self.meta["sop_uid"], self.meta.index, strict=True))
        # Images converted from PNG/JPEG files have no series; each image is its own.
        series = self.meta["series_uid"] if "series_uid" in self.meta else self.meta["sop_uid"]
        self.series = series.map(_base_series)
        files = self.meta["source_file"] if "source_file" in self.meta else pd.Series(dtype=str)
        self.row_of_file = dict(zip(files, files.index, strict=True))

    def native_sizes(self) -> dict[str, tuple[int, int]]:
        """Native (height, width) per SOP UID, where the dataset records them."""
        if self.native_shapes is None:
            return {}
        pairs = zip(self.meta["sop_uid"], self.native_shapes, strict=True)
        return {str(uid): (int(h), int(w)) for uid, (h, w) in pairs}

    def row_of_key(self, key: str) -> int | None:
        """The row of a mask keyed by source file or SOP UID (None: not converted)."""
        row = self.row_of_file.get(key, self.row_of_sop.get(key))
        return None if row is None else int(row)

    def rows_of_series(self, series_uids: Iterable[str]) -> np.ndarray:
        return np.flatnonzero(self.series.isin(set(series_uids)).to_numpy())

    def geometry(self, row: int, origin: str) -> dict:
        """Native grid of a slice, read from its DICOM file (for contour rasterisation)."""
        if row not in self._geometry:
            if self.dicom_dir is None:
                raise MaskError(f"{origin}: rasterising contours needs --dicom-dir")
            source = str(self.meta.at[row, "source_file"])
            if "#" in source:
                raise MaskError(
                    f"{origin}: slice {self.meta.at[row, 'sop_uid']} is a frame of a "
                    f"multi-frame file ({source}); RTSTRUCT on multi-frame images is not supported"
                )
            with open(self.dicom_dir / source, "rb") as handle:
                ds = read_dataset(handle, stop_before_pixels=True)
            orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
            self._geometry[row] = {
                "position": np.asarray(ds.ImagePositionPatient, dtype=np.float64),
                "row_dir": orientation[:3],
                "col_dir": orientation[3:],
                "normal": np.cross(orientation[:3], orientation[3:]),
                "spacing": np.asarray(ds.PixelSpacing, dtype=np.float64),  # (row, column)
                "shape": (int(ds.Rows), int(ds.Columns)),
                "thickness": float(getattr(ds, "SliceThickness", 0) or 0),
            }
        return self._geometry[row]


@dataclass
class Annotation:
    """What a reader found: native-grid masks per row and the rows it annotates."""

    masks: dict[int, np.ndarray] = field(default_factory=dict)
    annotated: set[int] = field(default_factory=set)

    def add(self, row: int, mask: np.ndarray) -> None:
        mask = np.asarray(mask, dtype=bool)
        previous = self.masks.get(row)
        self.masks[row] = mask if previous is None else previous | mask
        self.annotated.add(row)


def _dicom_files(source: Path, sop_class: str, what: str) -> list[tuple[Path, pydicom.Dataset]]:
    """The objects of one SOP class in a file or folder; an error when there are none."""
    paths = [source] if source.is_file() else list(iter_files(source))
    found = []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                ds = read_dataset(handle)
        except Exception:  # not DICOM: a folder may hold other files
            continue
        if str(getattr(ds, "SOPClassUID", "")) == sop_class:
            found.append((path, ds))
    if not found:
        raise MaskError(f"{source}: no {what} object (SOP class {sop_class}) found")
    return found


def _sop_rows(slices: Slices, uids: Sequence[str], origin: str) -> list[int]:
    missing = [uid for uid in uids if uid not in slices.row_of_sop]
    if missing:
        raise MaskError(
            f"{origin}: {len(missing)} referenced image(s) are not in the converted data "
            f"(first: {missing[:3]})"
        )
    return [int(slices.row_of_sop[uid]) for uid in uids]


def read_seg(source: Path, structure: str, slices: Slices) -> Annotation:
    """Masks of segment ``structure`` from DICOM-SEG objects (see the module docstring)."""
    result = Annotation()
    for path, ds in _dicom_files(source, SEG_STORAGE, "DICOM-SEG"):
        numbers = [
            int(item.SegmentNumber)
            for item in ds.SegmentSequence
            if str(item.SegmentLabel).strip().lower() == structure.lower()
        ]
        if not numbers:
            labels = [str(item.SegmentLabel) for item in ds.SegmentSequence]
            log.info("%s: no segment %r (has %s); skipped", path, structure, labels)
            continue
        frames = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
        threshold = 0.5
        if str(getattr(ds, "SegmentationType", "BINARY")) == "FRACTIONAL":
            threshold = float(ds.MaximumFractionalValue) / 2
        for series in getattr(ds, "ReferencedSeriesSequence", []):
            result.annotated.update(slices.rows_of_series([str(series.SeriesInstanceUID)]))
        for index, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
            segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            if segment not in numbers:
                continue
            try:
                uid = str(
                    group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                )
            except (AttributeError, IndexError) as err:
                raise MaskError(
                    f"{path}: frame {index + 1} does not name its source image "
                    "(DerivationImageSequence/SourceImageSequence)"
                ) from err
            (row,) = _sop_rows(slices, [uid], str(path))
            result.add(row, frames[index] >= threshold)
    return result


def rasterise(points: np.ndarray, geometry: dict) -> np.ndarray:
    """Fill one closed contour (K, 3 patient mm) on a slice's native pixel grid.

    Pixel (r, c) is inside when its centre is inside the polygon; matplotlib's
    point-in-polygon test is used because the project has no image-processing
    library that rasterises polygons, and it is exact for that test.
    """
    offset = points - geometry["position"]
    cols = offset @ geometry["row_dir"] / geometry["spacing"][1]
    rows = offset @ geometry["col_dir"] / geometry["spacing"][0]
    height, width = geometry["shape"]
    grid_r, grid_c = np.mgrid[0:height, 0:width]
    centres = np.column_stack([grid_c.ravel(), grid_r.ravel()])
    from matplotlib.path import Path as Polygon  # lazy: only RTSTRUCT needs it

    inside = Polygon(np.column_stack([cols, rows])).contains_points(centres, radius=1e-9)
    return inside.reshape(height, width)


def _contour_row(contour, points: np.ndarray, slices: Slices, candidates, origin: str) -> int:
    """The slice a contour lies on: its referenced image, or the plane within half a slice."""
    images = getattr(contour, "ContourImageSequence", None)
    if images:
        (row,) = _sop_rows(slices, [str(images[0].ReferencedSOPInstanceUID)], origin)
        return row
    best, best_distance = None, np.inf
    for row in candidates:
        geometry = slices.geometry(int(row), origin)
        distance = float(np.abs((points - geometry["position"]) @ geometry["normal"]).max())
        if distance < best_distance:
            best, best_distance = int(row), distance
    tolerance = 0.5 * (slices.geometry(best, origin)["thickness"] or 1.0) if best is not None else 0
    if best is None or best_distance > tolerance:
        raise MaskError(
            f"{origin}: a contour at z≈{points[:, 2].mean():.1f} mm lies on no converted slice"
        )
    return best


def read_rtstruct(source: Path, structure: str, slices: Slices) -> Annotation:
    """Masks of ROI ``structure`` from RT Structure Sets (see the module docstring)."""
    result = Annotation()
    for path, ds in _dicom_files(source, RTSTRUCT_STORAGE, "RTSTRUCT"):
        numbers = {
            int(item.ROINumber)
            for item in ds.StructureSetROISequence
            if str(item.ROIName).strip().lower() == structure.lower()
        }
        if not numbers:
            names = [str(item.ROIName) for item in ds.StructureSetROISequence]
            log.info("%s: no ROI %r (has %s); skipped", path, structure, names)
            continue
        series_uids = {
            str(series.SeriesInstanceUID)
            for frame in getattr(ds, "ReferencedFrameOfReferenceSequence", [])
            for study in getattr(frame, "RTReferencedStudySequence", [])
            for series in getattr(study, "RTReferencedSeriesSequence", [])
        }
        candidates = slices.rows_of_series(series_uids)
        if not len(candidates):
            patient = str(getattr(ds, "PatientID", ""))
            candidates = np.flatnonzero((slices.meta["patient_id"] == patient).to_numpy())
        result.annotated.update(int(r) for r in candidates)
        # Contours on one slice are combined by XOR (even-odd rule), so a contour
        # inside another is a hole, as treatment-planning systems draw them.
        filled: dict[int, np.ndarray] = {}
        for roi in ds.ROIContourSequence:
            if int(roi.ReferencedROINumber) not in numbers:
                continue
            for contour in getattr(roi, "ContourSequence", []):
                if str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")) != (
                    "CLOSED_PLANAR"
                ):
                    continue
                points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
                row = _contour_row(contour, points, slices, candidates, str(path))
                mask = rasterise(points, slices.geometry(row, str(path)))
                filled[row] = mask if row not in filled else filled[row] ^ mask
        for row, mask in filled.items():
            result.add(row, mask)
        result.annotated.update(slices.rows_of_series({slices.series[r] for r in filled}))
    return result


def read_folder(source: Path, structure: str, slices: Slices) -> Annotation:
    """Masks from ``<source>/<structure>/<sop_uid>.png`` or ``.../<series_uid>/<index>.png``."""
    root = source / structure if structure else source
    if not root.is_dir():
        raise MaskError(f"{root}: mask folder not found")
    result = Annotation()
    by_slice = {
        (uid, int(index)): row
        for row, (uid, index) in enumerate(
            zip(slices.meta["series_uid"], slices.meta["slice_index"], strict=True)
        )
    }
    unmatched = []
    for path in sorted(root.rglob("*.png")):
        row = slices.row_of_sop.get(path.stem)
        if row is None and path.stem.isdigit():
            row = by_slice.get((path.parent.name, int(path.stem)))
        if row is None:
            unmatched.append(path.relative_to(root).as_posix())
            continue
        with Image.open(path) as image:
            result.add(int(row), np.asarray(image.convert("L")) > 0)
    if unmatched:
        raise MaskError(
            f"{root}: {len(unmatched)} mask file(s) match no converted slice by SOP UID or "
            f"series/slice index (first: {unmatched[:3]})"
        )
    return result


def _attach_keyed(masks: dict[str, np.ndarray], slices: Slices, origin: str) -> Annotation:
    """Masks keyed by source file or SOP UID onto the rows; keys of unconverted images are logged.

    A preset's manifest can leave images out (rejects, frontal-only scans), so
    masks without a converted image are expected and counted, not an error;
    no match at all is the error of :func:`build_masks`.
    """
    result = Annotation()
    unmatched = []
    for key, mask in masks.items():
        row = slices.row_of_key(key)
        if row is None:
            unmatched.append(key)
        else:
            result.add(row, mask)
    if unmatched:
        log.warning(
            "%s: %d of %d masks belong to no converted image (first: %s)",
            origin,
            len(unmatched),
            len(masks),
            sorted(unmatched)[:3],
        )
    return result


def read_rle(source: Path, structure: str, slices: Slices) -> Annotation:
    """Masks from SIIM-ACR's ``train-rle.csv`` (see the module docstring)."""
    from medssl.datasets.presets.siim import RLE_FILE, rle_masks  # lazy: presets import pydicom

    path = source / RLE_FILE if source.is_dir() else source
    if not path.is_file():
        raise MaskError(f"{path}: run-length mask table not found")
    return _attach_keyed(rle_masks(path, slices.native_sizes()), slices, str(path))


def read_preset(source: Path, structure: str, slices: Slices) -> Annotation:
    """Masks from a dataset preset's own mask files (see the module docstring)."""
    from medssl.datasets.presets import look_up_preset

    if not slices.preset:
        raise MaskError(f"{source}: mask format 'preset' needs the preset's name (--preset)")
    masks = look_up_preset(slices.preset).masks(source, structure, slices.native_sizes())
    return _attach_keyed(masks, slices, f"{slices.preset} {structure} masks in {source}")


READERS: Registry[Callable[[Path, str, Slices], Annotation]] = Registry(
    "mask format",
    {
        "seg": read_seg,
        "rtstruct": read_rtstruct,
        "folder": read_folder,
        "rle": read_rle,
        "preset": read_preset,
    },
)
"""Per mask ``format``: the reader of its masks (see the module docstring)."""


def to_stored_grid(mask: np.ndarray, height: int, width: int, origin: str) -> np.ndarray:
    """A native-grid mask resized like the images (area average, then >= 0.5)."""
    if mask.shape == (height, width):
        return mask.astype(np.uint8)
    if height != width:
        raise MaskError(f"{origin}: mask {mask.shape} does not match the slices {height}x{width}")
    resized = resize(mask[None].astype(np.float32), height)[0]
    return (resized >= 0.5).astype(np.uint8)


GEOMETRY_META = ("original_shape", "resized_shape", "pad_offset")
"""The ``/meta`` columns that record where each native image landed (:class:`resizing.Geometry`)."""


def geometry_meta(data: str | Path) -> dict[str, np.ndarray]:
    """The per-row geometry columns the dataset records (some or none, in older files)."""
    with h5py.File(data, "r") as handle:
        return {
            name: handle[f"meta/{name}"][...].astype(np.int64)
            for name in GEOMETRY_META
            if f"meta/{name}" in handle
        }


def stored_mask(
    mask: np.ndarray,
    row: int,
    height: int,
    width: int,
    geometry: dict[str, np.ndarray],
    origin: str,
) -> np.ndarray:
    """A native-grid mask on the stored grid of its row: the one place masks are resampled.

    With the row's recorded geometry the mask takes its image's exact path
    (resampled by area to the resized shape, then padded or cropped at the
    same offset: :func:`medssl.datasets.resizing.to_stored_grid`); a mask of
    another size than the native image belongs to another image. Datasets
    without the geometry columns get the square resize of :func:`to_stored_grid`.
    """
    if "original_shape" in geometry:
        native = tuple(int(v) for v in geometry["original_shape"][row])
        if tuple(mask.shape) != native:
            raise MaskError(
                f"{origin}: mask is {mask.shape[0]}x{mask.shape[1]} but the image was "
                f"{native[0]}x{native[1]} before conversion"
            )
    if all(name in geometry for name in GEOMETRY_META):
        placed = resizing.Geometry.from_meta(geometry, row, (height, width))
        return resizing.to_stored_grid(mask.astype(np.uint8), placed, "area").astype(np.uint8)
    return to_stored_grid(mask, height, width, origin)


def build_masks(
    data: str | Path,
    fmt: str,
    source: str | Path,
    structure: str,
    dicom_dir: str | Path | None = None,
    preset: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) uint8 masks and (N,) annotated flags aligned with the rows of ``data``.

    ``preset``: the dataset preset whose mask files ``source`` holds (format ``preset``).
    """
    reader = READERS[fmt]
    meta = read_meta(data)
    geometry = geometry_meta(data)
    dicom = None if dicom_dir is None else Path(dicom_dir)
    slices = Slices(meta, dicom, preset=preset, native_shapes=geometry.get("original_shape"))
    annotation = reader(Path(source), structure, slices)
    _, height, width = image_shape(data)
    masks = np.zeros((len(meta), height, width), dtype=np.uint8)
    annotated = np.zeros(len(meta), dtype=bool)
    annotated[sorted(annotation.annotated)] = True
    for row, mask in annotation.masks.items():
        origin = f"{source} ({meta.at[row, 'sop_uid']})"
        masks[row] = stored_mask(mask, row, height, width, geometry, origin)
    if not annotated.any():
        raise MaskError(f"{source}: no {structure!r} annotation matches a slice of {data}")
    log.info(
        "%s: %d of %d slices annotated, %d with foreground",
        source,
        int(annotated.sum()),
        len(meta),
        int((masks.reshape(len(meta), -1).any(1) & annotated).sum()),
    )
    return masks, annotated


def write_masks(path: str | Path, masks: np.ndarray, annotated: np.ndarray, attrs: dict) -> None:
    """Write the mask file atomically (one LZF-compressed chunk per slice)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        chunks = (1, *masks.shape[1:]) if len(masks) else None
        handle.create_dataset(MASKS, data=masks, chunks=chunks, compression="lzf")
        handle.create_dataset(ANNOTATED, data=annotated)
        for key, value in attrs.items():
            handle.attrs[key] = value if isinstance(value, str) else json.dumps(value)
