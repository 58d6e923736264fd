"""Series geometry checks that need all slices of a series at once.

Headers give each slice a position along the slice normal (see
:func:`medssl.dicom.reading.slice_position`). Once a series is sorted by it, two
problems of real archives become visible and are handled here:

* gaps: a step between neighbours that deviates from the series' median step
  (a missing file, or two acquisitions stored under one series UID). What to do
  about them is a policy, chosen in the config (:data:`GAP_POLICIES`);
* gantry tilt: the slices are stacked along a direction that is not the slice
  normal. The pixels are still right, but a volume built from them is sheared,
  so tilted series are reported, or rejected with ``tilt_policy: reject``
  (never resampled: this benchmark works on slices, and each slice is exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from medssl.core.registry import Registry

#: Steps differing from the median by more than this fraction of it are gaps.
DEFAULT_GAP_TOLERANCE = 0.5
#: Stacking directions further than this from the normal count as gantry tilt.
TILT_TOLERANCE_DEG = 0.5
#: What happens to a tilted series, by ``tilt_policy``: ``True`` rejects it whole
#: (for 2.5D/3D uses, where a sheared stack would mislead), ``False`` converts it
#: with a finding.
TILT_POLICIES: Registry[bool] = Registry("tilt policy", {"report": False, "reject": True})


@dataclass(frozen=True)
class Gap:
    """One irregular step in a sorted series: between slice ``index - 1`` and ``index``."""

    index: int
    step_mm: float
    median_mm: float

    def describe(self) -> str:
        return (
            f"step {self.step_mm:.3f} mm before slice {self.index} deviates from the "
            f"median {self.median_mm:.3f} mm"
        )


def find_gaps(z: Sequence[float], tolerance: float = DEFAULT_GAP_TOLERANCE) -> list[Gap]:
    """Irregular steps of sorted positions ``z`` (duplicates already removed).

    Relative to the median step, so that the check works for 0.6 mm and 5 mm
    reconstructions alike; a series needs three slices (two steps) before a
    median means anything.
    """
    if len(z) < 3:
        return []
    steps = np.diff(np.asarray(z, dtype=np.float64))
    median = float(np.median(steps))
    if median <= 0:
        return []
    deviation = np.abs(steps - median) / median
    return [Gap(int(i) + 1, float(steps[i]), median) for i in np.flatnonzero(deviation > tolerance)]


def split_runs(n: int, gaps: Sequence[Gap]) -> list[range]:
    """Index ranges of the regularly spaced runs between gaps."""
    cuts = [0, *(g.index for g in gaps), n]
    return [range(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def tilt_degrees(normal: np.ndarray, positions: Sequence[Sequence[float]]) -> float:
    """Angle between the slice normal and the direction the slices are stacked along.

    Measured from the first to the last position (the longest baseline, so
    rounding in ImagePositionPatient matters least); 0 for single slices.
    """
    if len(positions) < 2:
        return 0.0
    delta = np.asarray(positions[-1], dtype=np.float64) - np.asarray(positions[0], np.float64)
    length = float(np.linalg.norm(delta))
    if length < 1e-6:
        return 0.0
    cosine = min(1.0, abs(float(np.dot(delta / length, normal))))
    return math.degrees(math.acos(cosine))


#: How a series with gaps is handled. Each returns the index runs to convert,
#: or ``None`` to reject the whole series (only ever when there are gaps).
GapPolicy = Callable[[int, Sequence[Gap]], "list[range] | None"]


def reject_gapped(n: int, gaps: Sequence[Gap]) -> list[range] | None:
    """The whole series is rejected: for cohorts where a gap means a broken export."""
    return None if gaps else [range(n)]


def keep_whole(n: int, gaps: Sequence[Gap]) -> list[range]:
    """Converted as one series; the gaps are only reported."""
    return [range(n)]


GAP_POLICIES: Registry[GapPolicy] = Registry(
    "gap policy",
    {
        # Each regular run becomes its own series, so neighbouring slices in the
        # output are always neighbours in the body (what 2.5D inputs assume).
        "split": split_runs,
        "reject": reject_gapped,
        "keep": keep_whole,
    },
)
