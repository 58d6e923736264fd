"""Per-frame geometry of multi-frame images (Enhanced CT and kin).

An Enhanced CT file holds a whole series in one object; position, orientation,
spacing and rescale of each frame live in functional group sequences, either
per frame (PerFrameFunctionalGroupsSequence item k) or once for all frames
(SharedFunctionalGroupsSequence). pydicom exposes the sequences but not this
"per-frame, else shared" lookup, so it is written here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pydicom

#: (functional group sequence, attribute inside it)
POSITION = ("PlanePositionSequence", "ImagePositionPatient")
ORIENTATION = ("PlaneOrientationSequence", "ImageOrientationPatient")
SPACING = ("PixelMeasuresSequence", "PixelSpacing")
THICKNESS = ("PixelMeasuresSequence", "SliceThickness")
SLOPE = ("PixelValueTransformationSequence", "RescaleSlope")
INTERCEPT = ("PixelValueTransformationSequence", "RescaleIntercept")


@dataclass(frozen=True)
class FrameGeometry:
    """What a single-frame header would carry for frame ``frame`` (1-based, as in DICOM)."""

    frame: int
    position: tuple[float, ...]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, ...]
    slice_thickness: float | None
    rescale: tuple[float, float] | None  # (slope, intercept); None if the file has none


def is_functional_group_multiframe(ds: pydicom.Dataset) -> bool:
    """True when per-frame geometry is available (the only multi-frame form accepted)."""
    return "PerFrameFunctionalGroupsSequence" in ds


def _lookup(ds: pydicom.Dataset, item: pydicom.Dataset, path: tuple[str, str]) -> Any:
    """The attribute from the frame's functional groups, else the shared ones, else None."""
    sequence, keyword = path
    for groups in (item, _shared(ds)):
        if groups is not None and sequence in groups and len(groups[sequence].value):
            value = groups[sequence].value[0].get(keyword)
            if value not in (None, ""):
                return value
    return None


def _shared(ds: pydicom.Dataset) -> pydicom.Dataset | None:
    shared = ds.get("SharedFunctionalGroupsSequence")
    return shared[0] if shared else None


def _numbers(value: Any, count: int, what: str, frame: int) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"frame {frame}: malformed or missing {what} {value!r}") from err
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"frame {frame}: malformed {what} {list(numbers)}")
    return numbers


def frame_geometry(ds: pydicom.Dataset) -> list[FrameGeometry]:
    """Geometry of every frame; ValueError names the frame and attribute that is missing."""
    items = ds.PerFrameFunctionalGroupsSequence
    frames = int(ds.get("NumberOfFrames", len(items)) or len(items))
    if len(items) != frames:
        raise ValueError(
            f"PerFrameFunctionalGroupsSequence has {len(items)} items for {frames} frames"
        )
    result = []
    for number, item in enumerate(items, start=1):
        slope, intercept = _lookup(ds, item, SLOPE), _lookup(ds, item, INTERCEPT)
        thickness = _lookup(ds, item, THICKNESS)
        result.append(
            FrameGeometry(
                frame=number,
                position=_numbers(_lookup(ds, item, POSITION), 3, "ImagePositionPatient", number),
                orientation=_numbers(
                    _lookup(ds, item, ORIENTATION), 6, "ImageOrientationPatient", number
                ),
                pixel_spacing=_numbers(_lookup(ds, item, SPACING), 2, "PixelSpacing", number),
                slice_thickness=None if thickness is None else float(thickness),
                rescale=None
                if slope is None or intercept is None
                else (float(slope), float(intercept)),
            )
        )
    return result
