"""Segmentation masks attached to the converted slices: DICOM-SEG, RTSTRUCT or an image folder.

Run as ``python -m medssl.masks`` (:mod:`medssl.masks`). The converted HDF5
is not touched; the masks go to their own file, row ``i`` of which belongs
to row ``i`` of the dataset::

    /masks      (N, H, W) uint8 0/1, one chunk per slice, the images' H x W
    /annotated  (N,) bool: the slice has an annotation (possibly empty)
    root attrs: provenance (JSON), format, structure, source

Masks attach to slices by SOP Instance UID, the key every format carries, and
get the images' resize (:func:`medssl.datasets.resizing.resize`,
area-averaging on the native grid, then >= 0.5), so mask pixels sit where the
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

    def __post_init__(self) -> None:
        self.row_of_sop = dict(zip(self.meta["sop_uid"], self.meta.index, strict=True))
        self.series = self.meta["series_uid"].map(_base_series)

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


READERS: Registry[Callable[[Path, str, Slices], Annotation]] = Registry(
    "mask format", {"seg": read_seg, "rtstruct": read_rtstruct, "folder": read_folder}
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


def build_masks(
    data: str | Path,
    fmt: str,
    source: str | Path,
    structure: str,
    dicom_dir: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) uint8 masks and (N,) annotated flags aligned with the rows of ``data``."""
    reader = READERS[fmt]
    meta = read_meta(data)
    slices = Slices(meta, None if dicom_dir is None else Path(dicom_dir))
    annotation = reader(Path(source), structure, slices)
    _, height, width = image_shape(data)
    masks = np.zeros((len(meta), height, width), dtype=np.uint8)
    annotated = np.zeros(len(meta), dtype=bool)
    annotated[sorted(annotation.annotated)] = True
    for row, mask in annotation.masks.items():
        masks[row] = to_stored_grid(mask, height, width, f"{source} ({meta.at[row, 'sop_uid']})")
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
