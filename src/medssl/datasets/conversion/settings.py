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
}
"""The pipeline's settings; ``workflow/schemas/config.schema.yaml`` states the same
defaults (a test compares them)."""

#: Standalone defaults: the data as stored, nothing lost (the pipeline passes
#: its own settings from config.yaml instead).
STANDALONE_DEFAULTS: dict[str, Any] = {"intensity": {"policy": "hu"}, "image_size": None}

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


def resolve_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in; unknown keys are logged (the section may carry other stages' keys)."""
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
    Intensity.from_settings(resolved["intensity"])  # fail early on a bad policy
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


def _check_numbers(resolved: dict[str, Any]) -> None:
    """``gap_tolerance`` is positive; ``max_reject_fraction`` is null or a fraction."""
    tolerance = resolved["gap_tolerance"]
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or tolerance <= 0:
        raise ValueError(f"gap_tolerance must be a positive number, got {tolerance!r}")
    fraction = resolved["max_reject_fraction"]
    if fraction is not None and (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not 0 <= fraction <= 1
    ):
        raise ValueError(f"max_reject_fraction must be null or in [0, 1], got {fraction!r}")
