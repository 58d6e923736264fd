"""DICOM reading and slice geometry for the conversion (:mod:`medssl.datasets.conversion`).

Headers are read without pixel data first (cheap), so that a whole folder can
be screened, grouped into series and sorted before any pixel is decoded. Every
file ends up either as a :class:`SliceHeader` or as a rejection with a reason a
person can act on; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from medssl.dicom.multiframe import frame_geometry, is_functional_group_multiframe
from medssl.dicom.rawheader import PixelLayout, read_raw_header, read_raw_pixels

#: Tags every image must carry: identity (for splitting by patient and joining
#: labels) and geometry (for sorting and spacing).
REQUIRED_TAGS = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
)

#: Projection radiography (computed and digital radiographs, mammograms,
#: fluoroscopy, angiography, dental): one 2-D image with no patient-space
#: position or orientation (SIIM-ACR's radiographs carry neither), and often
#: only ImagerPixelSpacing, the spacing at the detector. Such an image is a
#: one-slice series at z = 0.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RF", "XA", "PX", "IO"})
PROJECTION_OPTIONAL = frozenset({"ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"})
AXIAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

#: Without the rescale, CT stored values are not HU (typically off by 1024), so
#: guessing slope 1 / intercept 0 would silently corrupt the intensities.
REQUIRED_RESCALE_MODALITIES = frozenset({"CT"})

#: First two bytes of the pixel data tags (7FE0,xxxx) in little- and big-endian files.
_PIXEL_GROUP = (b"\xe0\x7f", b"\x7f\xe0")

#: Files that are part of a DICOM file set but never images.
# DICOMDIR is an index, not an image; Snakemake marks directory outputs with
# .snakemake_timestamp. Neither is data, so neither is counted or rejected.
SKIPPED_NAMES = frozenset({"DICOMDIR", ".SNAKEMAKE_TIMESTAMP"})  # compared upper-cased


@dataclass(frozen=True)
class SliceHeader:
    """What convert needs from one image header; small and picklable for workers."""

    file: str  # path relative to the scanned folder, as reported in outputs
    path: str  # absolute path, for reading the pixels later
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    orientation: tuple[float, ...]  # six direction cosines
    position: tuple[float, float, float]
    slice_thickness: float | None
    spacing_between_slices: float | None
    instance_number: int | None
    z: float  # position along the slice normal in mm: the sort key of a series
    frame: int | None = None  # 1-based frame of a multi-frame file; None for single frames
    rescale: tuple[float, float] | None = None  # (slope, intercept) from functional groups
    #: Set when the file takes the fast path of :mod:`medssl.dicom.rawheader`: where the
    #: samples are and how to turn them into HU without parsing the file again.
    pixels: PixelLayout | None = None
    padding: tuple[int, int | None] | None = None  # PixelPaddingValue, PixelPaddingRangeLimit

    @property
    def label(self) -> str:
        """How outputs name this image: the file, plus ``#frame`` inside multi-frame files."""
        return self.file if self.frame is None else f"{self.file}#{self.frame}"


@dataclass(frozen=True)
class Rejection:
    """One file that does not go into the dataset, and why."""

    file: str
    series_uid: str
    reason: str


#: How a dataset without the 128-byte preamble and "DICM" begins: a little-endian
#: tag of the file meta (0002,xxxx) or of the identifying group (0008,xxxx).
_BARE_DATASET_STARTS = (b"\x02\x00", b"\x08\x00")


def read_dataset(handle: BinaryIO, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """``dcmread`` that also accepts files without the preamble (old exports, ACR-NEMA).

    pydicom's ``force=True`` would read anything at all as a dataset, so it is
    used only when the file starts like a DICOM data set; everything else stays
    :class:`InvalidDicomError` ("not DICOM").
    """
    try:
        return pydicom.dcmread(handle, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        handle.seek(0)
        if handle.read(2) not in _BARE_DATASET_STARTS:
            raise
        handle.seek(0)
        return pydicom.dcmread(handle, stop_before_pixels=stop_before_pixels, force=True)


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file below ``root`` in a fixed (sorted) order, DICOMDIR excluded.

    The order only makes logs and reject lists reproducible; nothing downstream
    relies on it, since slices are sorted by geometry.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.upper() in SKIPPED_NAMES:
                continue
            path = Path(dirpath) / name
            if path.is_file():
                yield path


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane: row cosines x column cosines."""
    return _normal(tuple(float(v) for v in orientation)).copy()


@functools.lru_cache(maxsize=1024)
def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    """Cached: every slice of a series has the same orientation, and numpy's small-array
    overhead made this a tenth of the header pass."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if not math.isfinite(norm) or norm < 1e-6:
        raise ValueError(f"degenerate ImageOrientationPatient {list(orientation)}")
    return normal / norm


def slice_position(orientation: Sequence[float], position: Sequence[float]) -> float:
    """Signed distance of the slice along its normal: the only reliable slice order.

    InstanceNumber and file names are often wrong or shuffled; the geometry is not.
    """
    return float(np.dot(slice_normal(orientation), np.asarray(position, dtype=np.float64)))


def orientation_key(orientation: Sequence[float], decimals: int = 3) -> tuple[float, ...]:
    """Orientation rounded so that scanner float noise does not split a series."""
    return tuple(round(float(v), decimals) + 0.0 for v in orientation)


def _image_sop_class(uid: str) -> bool:
    """True for single-frame image storage classes known to pydicom's UID dictionary."""
    name = UID(uid).name
    return "Image Storage" in name


def _text(value: object) -> str:
    return str(value).strip() if value is not None else ""


def _floats(value: object, count: int, tag: str) -> tuple[float, ...]:
    """A multi-valued DS tag as floats, with an error naming the tag if malformed."""
    try:
        values = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError) as err:
        raise ValueError(f"malformed {tag} {value!r}") from err
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise ValueError(f"malformed {tag} {list(values)} (needs {count} finite numbers)")
    return values


def _optional_float(ds: pydicom.Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_header(
    path: Path, root: Path, modalities: Sequence[str]
) -> SliceHeader | list[SliceHeader] | Rejection:
    """Read one file's header and screen it; return the header or a rejection.

    The checks that need only the header happen here (readability, SOP class,
    required tags, modality, localizers, multi-frame, colour); checks that need
    the whole series (orientation, shape, duplicates) and the pixel decode come
    later. A multi-frame file with per-frame functional groups (Enhanced CT)
    gives one header per frame.
    """
    rel = path.relative_to(root).as_posix()
    fast = _fast_header(path, rel, modalities)
    if fast is not None:
        return fast
    try:
        with open(path, "rb") as handle:
            ds = read_dataset(handle, stop_before_pixels=True)
            # pydicom stops *at* the pixel data tag; a file that ends before it
            # was cut short (pydicom itself silently keeps the partial header).
            stopped_at = handle.tell()
            reached_pixels = handle.read(2) in _PIXEL_GROUP
    except InvalidDicomError as err:
        return Rejection(rel, "", f"not DICOM ({err})")
    except (EOFError, OSError) as err:
        return Rejection(rel, "", f"unreadable or truncated header ({type(err).__name__}: {err})")
    except Exception as err:  # pydicom raises many types on corrupt input
        return Rejection(rel, "", f"unreadable header ({type(err).__name__}: {err})")

    try:
        series_uid = _text(ds.get("SeriesInstanceUID"))
    except Exception as err:  # a corrupt element can fail on first access
        return Rejection(rel, "", f"unreadable header ({type(err).__name__}: {err})")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not reached_pixels and syntax != DeflatedExplicitVRLittleEndian:
        sop_class = _text(ds.get("SOPClassUID"))
        known = bool(sop_class) and UID(sop_class).name != sop_class
        if known and not _image_sop_class(sop_class):
            return Rejection(
                rel, series_uid, f"non-image SOP class {UID(sop_class).name} ({sop_class})"
            )
        return Rejection(
            rel,
            series_uid,
            f"truncated or no pixel data (file ends after {stopped_at} bytes, before PixelData)",
        )
    try:
        return _screen(ds, rel, os.path.abspath(path), series_uid, modalities)
    except Exception as err:
        return Rejection(rel, series_uid, f"unreadable header ({type(err).__name__}: {err})")


def _fast_header(path: Path, rel: str, modalities: Sequence[str]) -> SliceHeader | None:
    """The header of a simple file by :mod:`medssl.dicom.rawheader`, screened by the same code.

    Only files that pass every check come back; a rejection (or anything odd)
    returns ``None`` so that pydicom reads the file and words the reason.
    """
    raw = read_raw_header(str(path))
    if raw is None:
        return None
    modality = _text(raw.get("Modality")).upper()
    if raw.get("PhotometricInterpretation") == "MONOCHROME1" and modality != "CT":
        return None  # inverted on pydicom's path, which knows BitsStored semantics
    try:
        screened = _screen(
            raw,  # type: ignore[arg-type]  # answers get() and attributes like a Dataset
            rel,
            os.path.abspath(path),
            _text(raw.get("SeriesInstanceUID")),
            modalities,
        )
    except Exception:
        return None
    if not isinstance(screened, SliceHeader):
        return None
    slope = float(raw.get("RescaleSlope", 1) or 1)
    intercept = float(raw.get("RescaleIntercept", 0) or 0)
    padding = raw.get("PixelPaddingValue")
    return dataclasses.replace(
        screened,
        rescale=(slope, intercept),
        pixels=raw.pixels,
        padding=None if padding is None else (padding, raw.get("PixelPaddingRangeLimit")),
    )


def _screen(
    ds: pydicom.Dataset, rel: str, abspath: str, series_uid: str, modalities: Sequence[str]
) -> SliceHeader | list[SliceHeader] | Rejection:
    """The header checks of :func:`read_header`, in the order a person would ask."""
    reason = _sop_class_problem(ds)
    if reason is not None:
        return Rejection(rel, series_uid, reason)
    frames = ds.get("NumberOfFrames")
    n_frames = 1 if frames in (None, "") else int(frames)
    reason = _image_problem(ds, modalities, n_frames)
    if reason is not None:
        return Rejection(rel, series_uid, reason)
    modality = _text(ds.Modality).upper()
    if n_frames > 1:
        return _frame_headers(ds, rel, abspath, series_uid, modality)
    return _single_frame_header(ds, rel, abspath, series_uid, modality)


def _sop_class_problem(ds: pydicom.Dataset) -> str | None:
    """Why the object is no image at all (missing or non-image SOP class), or ``None``."""
    sop_class = _text(ds.get("SOPClassUID")) or _text(
        getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    )
    if not sop_class:
        return "missing required tag SOPClassUID"
    if not _image_sop_class(sop_class):
        return f"non-image SOP class {UID(sop_class).name} ({sop_class})"
    return None


def _image_problem(ds: pydicom.Dataset, modalities: Sequence[str], n_frames: int) -> str | None:
    """Why an image is not one this conversion takes, or ``None``.

    Structure, required tags, modality, then image type: the first problem a
    person would look for is the one reported.
    """
    multiframe = n_frames > 1
    if multiframe and not is_functional_group_multiframe(ds):
        return f"multi-frame image ({n_frames} frames) without per-frame functional groups"
    # Enhanced objects keep geometry and rescale in functional groups, not at the top level.
    required = REQUIRED_TAGS[:6] if multiframe else REQUIRED_TAGS
    if _is_projection(ds):
        required = tuple(k for k in required if k not in PROJECTION_OPTIONAL)
        if not any(_present(ds.get(k)) for k in ("PixelSpacing", "ImagerPixelSpacing")):
            return "missing required tag PixelSpacing (or ImagerPixelSpacing)"
    for keyword in required:
        value = ds.get(keyword)
        if value is None or (isinstance(value, str) and not value.strip()) or value == []:
            return f"missing required tag {keyword}"

    modality = _text(ds.Modality).upper()
    if modality not in {m.upper() for m in modalities}:
        return f"modality {modality} not in {list(modalities)}"
    if modality in REQUIRED_RESCALE_MODALITIES and not multiframe:
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            if ds.get(keyword) in (None, ""):
                return f"missing required tag {keyword}"

    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "localizer (ImageType contains LOCALIZER)"
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        return f"not greyscale (SamplesPerPixel={samples})"
    return None


def _present(value: object) -> bool:
    return not (value is None or (isinstance(value, str) and not value.strip()) or value == [])


def _is_projection(ds: pydicom.Dataset) -> bool:
    """A projection radiograph without patient-space geometry (see PROJECTION_MODALITIES)."""
    modality = _text(ds.get("Modality")).upper()
    return modality in PROJECTION_MODALITIES and not _present(ds.get("ImagePositionPatient"))


def _plane_geometry(
    ds: pydicom.Dataset,
) -> tuple[tuple[float, ...], tuple[float, ...], float, tuple[float, ...]]:
    """(orientation, position, z, pixel spacing) of one image; a projection radiograph
    without them lies at the origin, axial, with its detector spacing if that is all."""
    if _is_projection(ds):
        keyword = "PixelSpacing" if _present(ds.get("PixelSpacing")) else "ImagerPixelSpacing"
        spacing = _floats(ds.get(keyword), 2, keyword)
        return AXIAL_ORIENTATION, (0.0, 0.0, 0.0), 0.0, spacing
    orientation = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient")
    position = _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient")
    z = slice_position(orientation, position)
    spacing = _floats(ds.PixelSpacing, 2, "PixelSpacing")
    return orientation, position, z, spacing


def _single_frame_header(
    ds: pydicom.Dataset, rel: str, abspath: str, series_uid: str, modality: str
) -> SliceHeader | Rejection:
    """The header of a screened single-frame image, or why its geometry is unusable."""
    try:
        orientation, position, z, spacing = _plane_geometry(ds)
    except ValueError as err:
        return Rejection(rel, series_uid, str(err))
    if min(spacing) <= 0:
        return Rejection(rel, series_uid, f"non-positive PixelSpacing {list(spacing)}")
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows < 1 or columns < 1:
        return Rejection(rel, series_uid, f"empty image ({rows}x{columns})")

    instance = ds.get("InstanceNumber")
    return SliceHeader(
        file=rel,
        path=abspath,
        patient_id=_text(ds.PatientID),
        study_uid=_text(ds.StudyInstanceUID),
        series_uid=series_uid,
        sop_uid=_text(ds.SOPInstanceUID),
        modality=modality,
        rows=rows,
        columns=columns,
        pixel_spacing=(spacing[0], spacing[1]),
        orientation=orientation,
        position=(position[0], position[1], position[2]),
        slice_thickness=_optional_float(ds, "SliceThickness"),
        spacing_between_slices=_optional_float(ds, "SpacingBetweenSlices"),
        instance_number=None if instance in (None, "") else int(instance),
        z=z,
    )


def _frame_headers(
    ds: pydicom.Dataset, rel: str, abspath: str, series_uid: str, modality: str
) -> list[SliceHeader] | Rejection:
    """One header per frame of an Enhanced (functional group) multi-frame image."""
    try:
        frames = frame_geometry(ds)
    except ValueError as err:
        return Rejection(rel, series_uid, str(err))
    if modality in REQUIRED_RESCALE_MODALITIES and any(f.rescale is None for f in frames):
        return Rejection(rel, series_uid, "missing required tag RescaleSlope/RescaleIntercept")
    rows, columns = int(ds.Rows), int(ds.Columns)
    return [
        SliceHeader(
            file=rel,
            path=abspath,
            patient_id=_text(ds.PatientID),
            study_uid=_text(ds.StudyInstanceUID),
            series_uid=series_uid,
            sop_uid=_text(ds.SOPInstanceUID),
            modality=modality,
            rows=rows,
            columns=columns,
            pixel_spacing=(f.pixel_spacing[0], f.pixel_spacing[1]),
            orientation=f.orientation,
            position=(f.position[0], f.position[1], f.position[2]),
            slice_thickness=f.slice_thickness,
            spacing_between_slices=None,
            instance_number=None,
            z=slice_position(f.orientation, f.position),
            frame=f.frame,
            rescale=f.rescale,
        )
        for f in frames
    ]


def read_slice_hu(header: SliceHeader) -> np.ndarray:
    """HU of one slice (see :func:`stored_to_hu`): by the fast path when the header
    came from it, else decoded by pydicom. ValueError says why a slice is unusable."""
    if header.pixels is None:
        return read_hu(header.path, header.rows, header.columns, header.frame, header.rescale)
    stored = read_raw_pixels(header.path, header.pixels, header.rows, header.columns)
    slope, intercept = header.rescale or (1.0, 0.0)
    return stored_to_hu(stored, slope, intercept, header.padding)


def stored_to_hu(
    stored: np.ndarray,
    slope: float,
    intercept: float,
    padding: tuple[int, int | None] | None = None,
) -> np.ndarray:
    """HU = stored x slope + intercept, with pixel padding set to air (-1000 HU).

    Padding (the scanner's "outside the field of view" marker) becomes air so
    that it neither looks like tissue nor stretches a min-max scaling. CT almost
    always has slope 1 and an integer intercept: then HU are computed exactly in
    int32 (half the memory traffic of float64, and no rounding later); any
    other rescale gives float64.
    """
    if stored.dtype.kind in "iu" and slope == 1 and float(intercept).is_integer():
        low, high = int(stored.min()), int(stored.max())
        shift = int(intercept)
        # int16 when the stored values and the HU both fit (12-bit CT with intercept
        # -1024 does): the stored dtype of the default policy, so no later pass.
        fits = min(low, low + shift) >= -32768 and max(high, high + shift) <= 32767
        hu = np.add(stored, shift, dtype=np.int16 if fits else np.int32, casting="unsafe")
    else:
        hu = np.multiply(stored, slope, dtype=np.float64)  # one pass, no temporary
        hu += intercept
    if padding is not None:
        value, limit = padding
        if limit is None:
            mask = stored == value
        else:
            low, high = sorted((int(value), int(limit)))
            mask = (stored >= low) & (stored <= high)
        hu[mask] = -1000
    return hu


def read_hu(
    path: str,
    rows: int,
    columns: int,
    frame: int | None = None,
    rescale: tuple[float, float] | None = None,
) -> np.ndarray:
    """Decode one slice with pydicom (any transfer syntax) to HU (:func:`stored_to_hu`).

    ValueError says why the slice cannot be used.
    """
    with open(path, "rb") as handle:
        ds = read_dataset(handle)
    if "PixelData" not in ds:
        raise ValueError("missing PixelData")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    syntax_name = UID(str(syntax)).name if syntax else "unknown transfer syntax"
    if syntax is not None and not UID(str(syntax)).is_compressed:
        bits = int(ds.get("BitsAllocated", 16) or 16)
        expected = rows * columns * bits // 8 * int(ds.get("NumberOfFrames", 1) or 1)
        got = len(ds.PixelData)
        if got < expected:
            raise ValueError(f"truncated pixel data ({got} of {expected} bytes)")
    try:
        # Only the wanted frame is decoded, not the whole multi-frame object.
        stored = ds.pixel_array if frame is None else pixel_array(ds, index=frame - 1)
    except Exception as err:
        raise ValueError(
            f"undecodable pixel data ({syntax_name}: {type(err).__name__}: {err})"
        ) from err
    if stored.shape != (rows, columns):
        raise ValueError(f"decoded shape {stored.shape} differs from header {rows}x{columns}")

    if _inverted(ds):
        stored = invert_monochrome1(stored, ds)
    if rescale is not None:
        slope, intercept = rescale
    else:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    padding = ds.get("PixelPaddingValue")
    limit = ds.get("PixelPaddingRangeLimit")
    return stored_to_hu(
        stored,
        slope,
        intercept,
        None if padding is None else (int(padding), None if limit is None else int(limit)),
    )


def _inverted(ds: pydicom.Dataset) -> bool:
    """MONOCHROME1 (white = low) outside CT, where values are not HU and display
    polarity is all that says which end is dense. CT stored values are HU after
    the rescale whatever the photometric interpretation, so CT is left alone."""
    photometric = _text(ds.get("PhotometricInterpretation")).upper()
    return photometric == "MONOCHROME1" and _text(ds.get("Modality")).upper() != "CT"


def invert_monochrome1(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Mirror stored values within the range BitsStored allows, so high = dense."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        low, high = 0, (1 << bits) - 1
    return (low + high) - stored.astype(np.int64)
