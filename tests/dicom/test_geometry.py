"""Series geometry: gaps against the median step, split runs, gantry tilt."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medssl.core.registry import UnknownNameError
from medssl.dicom.geometry import (
    GAP_POLICIES,
    TILT_POLICIES,
    find_gaps,
    split_runs,
    tilt_degrees,
)
from medssl.dicom.reading import slice_normal


def test_gaps_are_relative_to_the_median_step() -> None:
    z = [0.0, 2.5, 5.0, 10.0, 12.5, 15.0]  # one missing slice at 7.5
    gaps = find_gaps(z)
    assert [(g.index, g.step_mm, g.median_mm) for g in gaps] == [(3, 5.0, 2.5)]
    assert "before slice 3" in gaps[0].describe()
    assert find_gaps([0.0, 0.6, 1.2, 1.8]) == []
    assert find_gaps([0.0, 0.6, 1.2, 1.55], tolerance=0.5) == []
    assert [g.index for g in find_gaps([0.0, 0.6, 1.2, 1.55], tolerance=0.2)] == [3]
    assert find_gaps([0.0, 9.0]) == []  # two slices: no median to compare with


def test_gap_policies() -> None:
    gaps = find_gaps([0.0, 1.0, 2.0, 5.0, 6.0, 7.0, 8.0])
    assert split_runs(7, gaps) == [range(0, 3), range(3, 7)]
    assert GAP_POLICIES["split"](7, gaps) == [range(0, 3), range(3, 7)]
    assert GAP_POLICIES["reject"](7, gaps) is None
    assert GAP_POLICIES["reject"](7, []) == [range(7)]
    assert GAP_POLICIES["keep"](7, gaps) == [range(7)]
    with pytest.raises(UnknownNameError, match="unknown gap policy 'kept'; did you mean 'keep'"):
        GAP_POLICIES["kept"]


def test_tilt_policies() -> None:
    assert dict(TILT_POLICIES) == {"report": False, "reject": True}  # True: rejected whole
    with pytest.raises(UnknownNameError, match="known: reject, report"):
        TILT_POLICIES["ignore"]


def test_tilt_from_positions() -> None:
    axial = [1, 0, 0, 0, 1, 0]
    normal = slice_normal(axial)
    straight = [(0.0, 0.0, float(k)) for k in range(10)]
    assert tilt_degrees(normal, straight) == pytest.approx(0.0)
    angle = math.radians(15)
    tilted = [(0.0, k * math.sin(angle), k * math.cos(angle)) for k in range(10)]
    assert tilt_degrees(normal, tilted) == pytest.approx(15.0)
    assert tilt_degrees(np.asarray(normal), straight[:1]) == 0.0
