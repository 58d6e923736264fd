"""The settings of the conversion (the ``data.convert`` config section) and their checks.

Every value is checked before the first file is read, so a typo in the
config fails in a second rather than after the header pass of a large archive.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import hdf5plugin

from medssl.core.registry import Registry, look_up
from medssl.datasets.conversion.intensity import INTENSITY_DEFAULTS, Intensity
from medssl.datasets.resizing import FITS, GEOMETRIES
from medssl.dicom.geometry import DEFAULT_GAP_TOLERANCE, GAP_POLICIES, TILT_POLICIES

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "modalities": ["CT"],
    "intensity": {key: INTENSITY_DEFAULTS[key] for key in ("policy", "windows")},
    "image_size": 64,
    "gap_policy": "split",
    "gap_tolerance": DEFAULT_GAP_TOLERANCE,
    "tilt_policy": "report",
    "max_reject_fraction": None,
    "pseudonym_key_env": None,
    "compression": "blosc",
    "fit": "pad",
    "geometry": "pad",
    "target_spacing": None,
    "rgb": "grey",
    "warn_reject_fraction": 0.05,
    "patient_key": "patient_id",
}
"""The pipeline's settings; ``workflow/schemas/config.schema.yaml`` states the same
defaults (a test compares them)."""

#: What identifies a DICOM image's patient: its PatientID, or (for releases whose
#: PatientID is one anonymised value for everybody, as RSNA-PE's) its study.
PATIENT_KEYS = ("patient_id", "study_uid")

#: Standalone defaults: the data as stored, nothing lost (the pipeline passes
#: its own settings from config.yaml instead).
STANDALONE_DEFAULTS: dict[str, Any] = {"intensity": {"policy": "hu"}, "image_size": None}

#: The sources of ``python -m medssl.convert --source``: DICOM folders and NIfTI
#: volumes hold HU; image files and npz archives hold stored integer pixels.
SOURCES = ("dicom", "images", "npz", "nifti")
#: ``rgb``: colour images as one luminance channel, or their three channels.
RGB_POLICIES = ("grey", "keep")

#: HDF5 filters for /images, one chunk per slice. Measured in bench/README.md on
#: 512 x 512 CT: Blosc (LZ4, byte shuffle) is 0.54 of raw size and writes and
#: reads 8-12x faster than LZF (0.80 of raw); gzip is too slow on the read path.
#: Reading Blosc needs ``import hdf5plugin`` (medssl.datasets.hdf5 does it).
BLOSC = {"cname": "lz4", "clevel": 5, "shuffle": hdf5plugin.Blosc.SHUFFLE}
COMPRESSION: Registry[dict[str, Any]] = Registry(
    "compression",
    {
        "blosc": dict(hdf5plugin.Blosc(**BLOSC)),
        "lzf": {"compression": "lzf"},
        "none": {},
    },
)
"""``compression`` setting -> the ``h5py.create_dataset`` filter arguments."""


def resolve_settings(settings: dict[str, Any] | None, source: str = "dicom") -> dict[str, Any]:
    """Defaults filled in; unknown keys are logged (the section may carry other stages' keys).

    ``source`` (one of :data:`SOURCES`) decides which intensity policies apply:
    HU policies for dicom and nifti, ``scale`` for images and npz.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    given = dict(settings or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        log.warning("convert ignores unknown settings %s", unknown)
    resolved = {**DEFAULTS, **{k: v for k, v in given.items() if k in DEFAULTS}}
    modalities = resolved["modalities"]
    if isinstance(modalities, str):
        modalities = [modalities]
    resolved["modalities"] = [str(m).upper() for m in modalities]
    size = resolved["image_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"image_size must be a positive integer or null, got {size!r}")
    intensity = Intensity.from_settings(resolved["intensity"])  # fail early on a bad policy
    if source in ("images", "npz") and intensity.takes_hu:
        # The pipeline's section always names a HU policy (the schema's default),
        # so for stored pixels it is replaced rather than failed on.
        if "policy" in (given.get("intensity") or {}):
            log.warning(
                "intensity.policy %r applies to HU; source %s stores its pixels with policy scale",
                intensity.policy,
                source,
            )
        resolved["intensity"] = {"policy": "scale"}
    elif source in ("dicom", "nifti") and not intensity.takes_hu:
        raise ValueError(
            f"intensity.policy {intensity.policy!r} does not apply to source {source}: "
            "HU need hu, window or minmax"
        )
    _check_geometry(resolved, source)
    # Each name setting is looked up once here, so a typo names the known choices.
    tables: dict[str, Registry[Any]] = {
        "compression": COMPRESSION,
        "gap_policy": GAP_POLICIES,
        "tilt_policy": TILT_POLICIES,
    }
    for key, table in tables.items():
        look_up(table.kind, resolved[key], table)
    _check_numbers(resolved)
    env = resolved["pseudonym_key_env"]
    if env is not None and not os.environ.get(str(env)):
        raise ValueError(
            f"pseudonym_key_env names environment variable {env!r}, which is not set or empty"
        )
    return resolved


def _check_geometry(resolved: dict[str, Any], source: str) -> None:
    """``geometry``, ``fit``, ``rgb`` and ``target_spacing`` (null or two positive mm)."""
    for key, known in (
        ("geometry", GEOMETRIES),
        ("fit", FITS),
        ("rgb", RGB_POLICIES),
        ("patient_key", PATIENT_KEYS),
    ):
        if resolved[key] not in known:
            raise ValueError(f"{key} must be one of {', '.join(known)}, got {resolved[key]!r}")
    target = resolved["target_spacing"]
    if target is None:
        return
    if (
        not isinstance(target, list | tuple)
        or len(target) != 2
        or any(isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 for v in target)
    ):
        raise ValueError(f"target_spacing must be null or [row, column] mm > 0, got {target!r}")
    if source in ("images", "npz"):
        raise ValueError(f"target_spacing needs pixel spacing, which source {source} does not have")
    resolved["target_spacing"] = [float(v) for v in target]


def _check_numbers(resolved: dict[str, Any]) -> None:
    """``gap_tolerance`` is positive; the reject fractions are null or fractions."""
    tolerance = resolved["gap_tolerance"]
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or tolerance <= 0:
        raise ValueError(f"gap_tolerance must be a positive number, got {tolerance!r}")
    for key in ("max_reject_fraction", "warn_reject_fraction"):
        fraction = resolved[key]
        if fraction is not None and (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0 <= fraction <= 1
        ):
            raise ValueError(f"{key} must be null or in [0, 1], got {fraction!r}")
