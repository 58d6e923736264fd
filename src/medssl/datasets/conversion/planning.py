"""The series plan: headers grouped into series, checked, and sorted along the slice normal.

Everything here works on headers only, before any pixel is decoded, so a
slice that cannot belong to its series (other orientation or shape, a
duplicate position) or a series that breaks a policy (gantry tilt, gaps) is
rejected with its reason at the cost of a header read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medssl.dicom.geometry import (
    DEFAULT_GAP_TOLERANCE,
    GAP_POLICIES,
    TILT_POLICIES,
    TILT_TOLERANCE_DEG,
    find_gaps,
    tilt_degrees,
)
from medssl.dicom.reading import Rejection, SliceHeader, orientation_key, slice_normal

#: Two slices of a series closer than this along the normal are the same position.
DUPLICATE_TOLERANCE_MM = 0.01


@dataclass
class SeriesPlan:
    """One series' slices after the header checks, sorted along the slice normal."""

    series_uid: str
    patient_id: str
    study_uid: str
    slices: list[SliceHeader]
    z: list[float]
    slice_spacing: float
    findings: list[str] = field(default_factory=list)  # gaps, tilt: reported, not rejected

    @property
    def sort_key(self) -> tuple[str, str, str]:
        return (self.patient_id, self.study_uid, self.series_uid)

    def parts(self, size: int) -> list[SeriesPlan]:
        """Consecutive pieces of at most ``size`` slices: units of work for the pool,
        so that one long series neither idles the other workers nor fills memory."""
        return [
            dataclasses.replace(self, slices=self.slices[i : i + size], z=self.z[i : i + size])
            for i in range(0, len(self.slices), size)
        ]


def pseudonymize(patient_id: str, key: bytes) -> str:
    """Keyed hash of a PatientID: stable (so patient-level splits still work) and,
    without the key, neither reversible nor guessable from a list of known ids."""
    return "P" + hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:20]


def _majority(values: Iterable[Any]) -> Any:
    """Most frequent value; ties go to the smallest, so the choice is reproducible."""
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


def plan_series(
    headers: Sequence[SliceHeader],
    image_size: int | None,
    gap_policy: str = "split",
    gap_tolerance: float = DEFAULT_GAP_TOLERANCE,
    pseudonym_key: bytes | None = None,
    tilt_policy: str = "report",
    geometry: str = "pad",
    patient_key: str = "patient_id",
) -> tuple[list[SeriesPlan], list[Rejection]]:
    """Group headers into series, apply the series-level checks, sort slices.

    With ``image_size`` null and ``geometry`` reject every slice keeps its
    native size, so series whose shape differs from the dataset's most common
    shape cannot share the array and are rejected whole; the other geometries
    (:class:`medssl.datasets.resizing.Grid`) keep every series. Gaps are handled
    by ``gap_policy`` (see
    :data:`medssl.dicom.geometry.GAP_POLICIES`); split parts are stored as series
    ``<SeriesInstanceUID>#1``, ``#2``, ... With ``pseudonym_key`` the stored
    patient ids are keyed hashes of the PatientID. ``patient_key`` ``study_uid``
    takes the study as the patient (a release that anonymised every PatientID alike).
    """
    rejected: list[Rejection] = []
    by_series: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        by_series[header.series_uid].append(header)

    plans: list[SeriesPlan] = []
    for series_uid, members in by_series.items():
        slices = _consistent_slices(series_uid, members, rejected)
        if not slices:
            continue
        findings: list[str] = []
        if not _passes_tilt_policy(series_uid, slices, tilt_policy, findings, rejected):
            continue
        z = [h.z for h in slices]
        runs = _gap_runs(series_uid, slices, z, gap_policy, gap_tolerance, findings, rejected)
        if runs is None:
            continue
        patient_id = _majority(getattr(h, patient_key) for h in slices)
        if pseudonym_key is not None:
            patient_id = pseudonymize(patient_id, pseudonym_key)
        for part, run in enumerate(runs, start=1):
            part_slices = [slices[i] for i in run]
            part_z = [z[i] for i in run]
            plans.append(
                SeriesPlan(
                    series_uid=series_uid if len(runs) == 1 else f"{series_uid}#{part}",
                    patient_id=patient_id,
                    study_uid=_majority(h.study_uid for h in slices),
                    slices=part_slices,
                    z=part_z,
                    slice_spacing=_slice_spacing(part_slices, part_z),
                    findings=findings,
                )
            )

    if image_size is None and geometry == "reject" and plans:
        plans = _keep_dataset_shape(plans, rejected)
    return sorted(plans, key=lambda p: p.sort_key), rejected


def _consistent_slices(
    series_uid: str, members: list[SliceHeader], rejected: list[Rejection]
) -> list[SliceHeader]:
    """The slices of one series that share its majority orientation and shape, sorted
    along the normal, one per position; the others are rejected with the reason."""
    members = sorted(members, key=lambda h: h.label)
    kept = _keep_majority(
        members,
        lambda h: orientation_key(h.orientation),
        lambda h, majority: (
            f"orientation {list(orientation_key(h.orientation))} differs from "
            f"series majority {list(majority)}"
        ),
        series_uid,
        rejected,
    )
    kept = _keep_majority(
        kept,
        lambda h: (h.rows, h.columns),
        lambda h, shape: (
            f"shape {h.rows}x{h.columns} differs from series majority {shape[0]}x{shape[1]}"
        ),
        series_uid,
        rejected,
    )
    slices: list[SliceHeader] = []
    for h in sorted(kept, key=lambda h: (h.z, h.label)):
        if slices and abs(h.z - slices[-1].z) < DUPLICATE_TOLERANCE_MM:
            reason = f"duplicate position z={h.z:.3f} mm in series (same as {slices[-1].label})"
            rejected.append(Rejection(h.label, series_uid, reason))
        else:
            slices.append(h)
    return slices


def _keep_majority(
    members: list[SliceHeader],
    value: Callable[[SliceHeader], Hashable],
    reason: Callable[[SliceHeader, Any], str],
    series_uid: str,
    rejected: list[Rejection],
) -> list[SliceHeader]:
    """The members whose ``value`` is the series majority's; the rest are rejected."""
    majority = _majority(value(h) for h in members)
    kept = []
    for h in members:
        if value(h) != majority:
            rejected.append(Rejection(h.label, series_uid, reason(h, majority)))
        else:
            kept.append(h)
    return kept


def _passes_tilt_policy(
    series_uid: str,
    slices: list[SliceHeader],
    tilt_policy: str,
    findings: list[str],
    rejected: list[Rejection],
) -> bool:
    """False when the series is tilted and ``tilt_policy`` rejects it (all its slices
    are then rejected); a tilt that is only reported becomes a finding."""
    tilt = tilt_degrees(slice_normal(slices[0].orientation), [h.position for h in slices])
    if tilt > TILT_TOLERANCE_DEG:
        if TILT_POLICIES[tilt_policy]:
            rejected.extend(
                Rejection(h.label, series_uid, f"gantry tilt {tilt:.1f} deg (tilt_policy reject)")
                for h in slices
            )
            return False
        findings.append(f"gantry tilt {tilt:.1f} deg (slices stacked off the normal)")
    return True


def _gap_runs(
    series_uid: str,
    slices: list[SliceHeader],
    z: list[float],
    gap_policy: str,
    gap_tolerance: float,
    findings: list[str],
    rejected: list[Rejection],
) -> list[range] | None:
    """The index runs ``gap_policy`` converts, or ``None`` when it rejects the series."""
    gaps = find_gaps(z, gap_tolerance)
    runs = GAP_POLICIES[gap_policy](len(slices), gaps)
    if gaps:
        detail = "; ".join(g.describe() for g in gaps)
        if runs is None:
            rejected.extend(
                Rejection(h.label, series_uid, f"series has gaps (gap_policy reject: {detail})")
                for h in slices
            )
            return None
        findings.append(f"{len(gaps)} gap(s), {len(runs)} part(s) ({gap_policy}): {detail}")
    assert runs is not None  # only the reject policy returns None, and only with gaps
    return runs


def _keep_dataset_shape(plans: list[SeriesPlan], rejected: list[Rejection]) -> list[SeriesPlan]:
    """At native size, the series of the dataset's most common shape (by slices);
    the others cannot share the array and are rejected whole."""
    weights: Counter[tuple[int, int]] = Counter()
    for p in plans:
        weights[(p.slices[0].rows, p.slices[0].columns)] += len(p.slices)
    shape = _majority(s for s, c in weights.items() if c == max(weights.values()))
    keep = []
    for p in plans:
        native = (p.slices[0].rows, p.slices[0].columns)
        if native == shape:
            keep.append(p)
            continue
        rejected.extend(
            Rejection(
                h.label,
                p.series_uid,
                f"shape {native[0]}x{native[1]} differs from dataset shape "
                f"{shape[0]}x{shape[1]} (image_size is null, so sizes must match)",
            )
            for h in p.slices
        )
    return keep


def _slice_spacing(slices: Sequence[SliceHeader], z: Sequence[float]) -> float:
    """Median gap along the normal; header values only for single-slice series."""
    if len(z) > 1:
        return float(np.median(np.diff(np.asarray(z))))
    if not slices:
        return float("nan")
    header = slices[0]
    for value in (header.spacing_between_slices, header.slice_thickness):
        if value:
            return abs(float(value))
    return float("nan")
