"""DICOM folder -> one HDF5 dataset in the layout of :mod:`medssl.datasets.hdf5`.

Every file found is either converted or listed in the rejects CSV with a reason
(``files seen = converted + rejected`` is checked), because a benchmark that
silently loses slices cannot be audited. The work happens in three passes:

1. headers only: readability, SOP class, required tags, modality, localizers
   (plain uncompressed files by :mod:`medssl.dicom.rawheader`, which also notes where
   their pixels are; everything else by pydicom with ``stop_before_pixels``);
2. per series: majority orientation and shape, sort along the slice normal
   (never by InstanceNumber or file name), drop duplicate positions, gaps and
   gantry tilt by their policies;
3. pixels in blocks of :data:`SLICES_PER_BLOCK` slices: decode, HU, resize,
   intensity policy. With ``--threads`` > 1, worker processes take parts of
   series (:data:`SLICES_PER_TASK` slices) and return them compressed into
   HDF5 chunks; the single writer places chunks in output order as results
   arrive, so memory holds a few parts, never the dataset.

Command line (``--help`` lists every option and the HDF5 layout)::

    python -m medssl.convert SRC_DIR OUT.h5            # standalone: CT, raw HU, native size
    python -m medssl.convert --dicom-dir DIR --out H5 --rejects CSV --settings JSON --threads N
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import hmac
import json
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from medssl.dicom.reading import (
    Rejection,
    SliceHeader,
    iter_files,
    orientation_key,
    read_header,
    read_slice_hu,
    slice_normal,
)
from medssl.core.faults import fault_point
from medssl.dicom.geometry import (
    DEFAULT_GAP_TOLERANCE,
    GAP_POLICIES,
    TILT_POLICIES,
    TILT_TOLERANCE_DEG,
    find_gaps,
    tilt_degrees,
)
from medssl.core.files import atomic_path, write_csv
from medssl.core.provenance import record

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "modalities": ["CT"],
    "intensity": {"policy": "window", "windows": [{"center": -300, "width": 1600}]},
    "image_size": 64,
    "gap_policy": "split",
    "gap_tolerance": DEFAULT_GAP_TOLERANCE,
    "tilt_policy": "report",
    "max_reject_fraction": None,
    "pseudonym_key_env": None,
    "compression": "blosc",
}
#: HDF5 filters for /images, one chunk per slice. Measured in bench/README.md on
#: 512 x 512 CT: Blosc (LZ4, byte shuffle) is 0.54 of raw size and writes and
#: reads 8-12x faster than LZF (0.80 of raw); gzip is too slow on the read path.
#: Reading Blosc needs ``import hdf5plugin`` (medssl.datasets.hdf5 does it).
BLOSC = {"cname": "lz4", "clevel": 5, "shuffle": hdf5plugin.Blosc.SHUFFLE}
COMPRESSION: dict[str, dict[str, Any]] = {
    "blosc": dict(hdf5plugin.Blosc(**BLOSC)),
    "lzf": {"compression": "lzf"},
    "none": {},
}
POLICIES = ("hu", "window", "minmax")
REJECT_COLUMNS = ("file", "series_uid", "reason")
#: Two slices of a series closer than this along the normal are the same position.
DUPLICATE_TOLERANCE_MM = 0.01
#: The layout of :mod:`medssl.datasets.hdf5`, spelled out here because importing that
#: module loads torch (seconds and ~900 MB per process) for three names; a test
#: checks that the two agree.
IMAGES = "images"
META = "meta"
STRING_META = ("patient_id", "study_uid", "series_uid", "sop_uid", "source_file")
_META_COLUMNS = (*STRING_META, "slice_index", "z", "spacing")
#: Tasks in flight per worker: enough to keep workers busy, small enough to bound memory.
PREFETCH_PER_WORKER = 2
#: Slices decoded before they are written or compressed: 16 MB at 512 x 512 int16,
#: under glibc's largest mmap threshold (32 MB), so the buffer's pages are reused.
SLICES_PER_BLOCK = 32
#: Slices per task sent to a worker process (a series is split into such parts).
SLICES_PER_TASK = 64


class NoUsableImagesError(RuntimeError):
    """Nothing in the folder could be converted; the message names the folder."""


class TooManyRejectsError(RuntimeError):
    """More files were rejected than ``max_reject_fraction`` allows."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Intensity:
    """How HU become stored values, and how stored values become model input."""

    policy: str
    windows: tuple[tuple[float, float], ...] = ()
    dtype: str = "int16"

    @classmethod
    def from_settings(cls, spec: dict[str, Any]) -> Intensity:
        """Validate the ``intensity`` settings section."""
        policy = spec.get("policy", "window")
        if policy not in POLICIES:
            raise ValueError(f"intensity.policy must be one of {POLICIES}, got {policy!r}")
        if policy == "window":
            windows = spec.get("windows") or DEFAULTS["intensity"]["windows"]
            parsed = []
            for window in windows:
                center, width = float(window["center"]), float(window["width"])
                if width <= 0:
                    raise ValueError(f"intensity window width must be positive, got {width}")
                parsed.append((center, width))
            return cls(policy, tuple(parsed))
        if policy == "hu":
            dtype = spec.get("dtype", "int16")
            if dtype not in ("int16", "float16"):
                raise ValueError(
                    f"intensity.dtype for policy hu must be int16 or float16, got {dtype!r}"
                )
            return cls(policy, dtype=dtype)
        return cls(policy)

    @property
    def n_channels(self) -> int:
        return len(self.windows) if self.policy == "window" else 1

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype) if self.policy == "hu" else np.dtype(np.uint8)

    @property
    def scale(self) -> float:
        """HU policy feeds HU/1000 (air -1, water 0, bone ~1); 8-bit policies feed 0..1."""
        return 1.0 / 1000.0 if self.policy == "hu" else 1.0 / 255.0

    @property
    def offset(self) -> float:
        return 0.0

    def channels(self) -> list[dict[str, Any]]:
        """The ``channels`` attribute: what each stored channel means."""
        if self.policy == "window":
            return [{"window": [c, w]} for c, w in self.windows]
        if self.policy == "hu":
            return [{"hu": self.dtype}]
        return [{"minmax": "per_slice"}]

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """(n, H, W) HU (int32 when exact, else float) -> (n, C, H, W) stored values."""
        if self.policy == "hu":
            if self.dtype == "int16":
                if hu.dtype == np.int16:  # exact HU that fit: nothing to do
                    return hu[:, None]
                out = hu if hu.dtype.kind in "iu" else np.rint(hu)
                # np.clip costs more than the rest of the slice's path; CT values
                # are almost never outside int16, so check first.
                if out.min() < -32768 or out.max() > 32767:
                    out = np.clip(out, -32768, 32767)
                out = out.astype(np.int16)
            else:
                out = hu.astype(np.float16)
            return out[:, None]
        if hu.dtype.kind in "iu":
            hu = hu.astype(np.float64)  # exact; the 8-bit policies round from float64
        if self.policy == "window":
            planes = []
            for center, width in self.windows:
                low = center - width / 2
                scaled = (np.clip(hu, low, low + width) - low) / width * 255.0
                planes.append(np.rint(scaled).astype(np.uint8))
            return np.stack(planes, axis=1)
        low = hu.min(axis=(1, 2), keepdims=True)
        span = hu.max(axis=(1, 2), keepdims=True) - low
        scaled = np.where(span > 0, (hu - low) / np.where(span > 0, span, 1.0), 0.0) * 255.0
        return np.rint(scaled).astype(np.uint8)[:, None]


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
    if resolved["compression"] not in COMPRESSION:
        raise ValueError(
            f"compression must be one of {sorted(COMPRESSION)}, got {resolved['compression']!r}"
        )
    if resolved["gap_policy"] not in GAP_POLICIES:
        raise ValueError(
            f"gap_policy must be one of {sorted(GAP_POLICIES)}, got {resolved['gap_policy']!r}"
        )
    if resolved["tilt_policy"] not in TILT_POLICIES:
        raise ValueError(
            f"tilt_policy must be one of {list(TILT_POLICIES)}, got {resolved['tilt_policy']!r}"
        )
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
    env = resolved["pseudonym_key_env"]
    if env is not None and not os.environ.get(str(env)):
        raise ValueError(
            f"pseudonym_key_env names environment variable {env!r}, which is not set or empty"
        )
    return resolved


def pseudonymize(patient_id: str, key: bytes) -> str:
    """Keyed hash of a PatientID: stable (so patient-level splits still work) and,
    without the key, neither reversible nor guessable from a list of known ids."""
    return "P" + hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:20]


# --------------------------------------------------------------------------- resizing


def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights resampling one axis.

    Shrinking averages the exact input area under each output pixel (no
    aliasing of noise or thin structures, also for non-integer ratios);
    enlarging interpolates linearly (pixel centres aligned, like
    ``align_corners=False``).
    """
    if n_in == n_out:
        return np.eye(n_in)
    weights = np.zeros((n_out, n_in))
    if n_out < n_in:
        scale = n_in / n_out
        low = np.arange(n_out)[:, None] * scale
        left = np.arange(n_in)[None, :]
        overlap = np.minimum(low + scale, left + 1) - np.maximum(low, left)
        return np.clip(overlap, 0.0, None) / scale
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    j0 = np.floor(src).astype(int)
    frac = src - j0
    j1 = np.minimum(j0 + 1, n_in - 1)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, j0), 1 - frac)
    np.add.at(weights, (rows, j1), frac)
    return weights


def _resample_axis(images: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """Apply (n_out, n_in) resampling weights along ``axis`` of a (n, H, W) stack.

    The weights are banded (a few inputs per output), so a gather and a short
    weighted sum replace the dense product. That avoids BLAS, whose thread pool
    turned this into the slowest step of the conversion on a busy small machine.
    """
    width = max(1, int((weights > 0).sum(axis=1).max()))
    index = np.argsort(weights <= 0, axis=1, kind="stable")[:, :width]
    index = np.sort(index, axis=1)
    taps = np.take_along_axis(weights, index, axis=1)  # (n_out, width)
    shape = [1, 1, 1]
    shape[axis] = weights.shape[0]
    out = np.take(images, index[:, 0], axis=axis) * taps[:, 0].reshape(shape)
    for k in range(1, width):
        out += np.take(images, index[:, k], axis=axis) * taps[:, k].reshape(shape)
    return out


def resize(images: np.ndarray, size: int | None) -> np.ndarray:
    """Resample (n, H, W) to (n, size, size); ``None`` keeps the native size."""
    if size is None:
        return images
    height, width = images.shape[1:]
    if (height, width) == (size, size):
        return images
    cols = _resample_axis(images, resample_matrix(width, size), axis=2)
    return _resample_axis(cols, resample_matrix(height, size), axis=1)


# --------------------------------------------------------------------------- series plan


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
) -> tuple[list[SeriesPlan], list[Rejection]]:
    """Group headers into series, apply the series-level checks, sort slices.

    With ``image_size`` null every slice keeps its native size, so series whose
    shape differs from the dataset's most common shape cannot share the array
    and are rejected whole. Gaps are handled by ``gap_policy`` (see
    :data:`medssl.dicom.geometry.GAP_POLICIES`); split parts are stored as series
    ``<SeriesInstanceUID>#1``, ``#2``, ... With ``pseudonym_key`` the stored
    patient ids are keyed hashes of the PatientID.
    """
    rejected: list[Rejection] = []
    by_series: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        by_series[header.series_uid].append(header)

    plans: list[SeriesPlan] = []
    for series_uid, members in by_series.items():
        members = sorted(members, key=lambda h: h.label)
        majority = _majority(orientation_key(h.orientation) for h in members)
        kept = []
        for h in members:
            if orientation_key(h.orientation) != majority:
                rejected.append(
                    Rejection(
                        h.label,
                        series_uid,
                        f"orientation {list(orientation_key(h.orientation))} differs from "
                        f"series majority {list(majority)}",
                    )
                )
            else:
                kept.append(h)
        shape = _majority((h.rows, h.columns) for h in kept)
        members, kept = kept, []
        for h in members:
            if (h.rows, h.columns) != shape:
                rejected.append(
                    Rejection(
                        h.label,
                        series_uid,
                        f"shape {h.rows}x{h.columns} differs from series majority "
                        f"{shape[0]}x{shape[1]}",
                    )
                )
            else:
                kept.append(h)
        ordered = sorted(kept, key=lambda h: (h.z, h.label))
        slices: list[SliceHeader] = []
        for h in ordered:
            if slices and abs(h.z - slices[-1].z) < DUPLICATE_TOLERANCE_MM:
                rejected.append(
                    Rejection(
                        h.label,
                        series_uid,
                        f"duplicate position z={h.z:.3f} mm in series (same as {slices[-1].label})",
                    )
                )
            else:
                slices.append(h)
        if not slices:
            continue
        patient_id = _majority(h.patient_id for h in slices)
        if pseudonym_key is not None:
            patient_id = pseudonymize(patient_id, pseudonym_key)
        findings = []
        tilt = tilt_degrees(slice_normal(slices[0].orientation), [h.position for h in slices])
        if tilt > TILT_TOLERANCE_DEG:
            if tilt_policy == "reject":
                rejected.extend(
                    Rejection(
                        h.label, series_uid, f"gantry tilt {tilt:.1f} deg (tilt_policy reject)"
                    )
                    for h in slices
                )
                continue
            findings.append(f"gantry tilt {tilt:.1f} deg (slices stacked off the normal)")
        z = [h.z for h in slices]
        gaps = find_gaps(z, gap_tolerance)
        runs = GAP_POLICIES[gap_policy](len(slices), gaps)
        if gaps:
            detail = "; ".join(g.describe() for g in gaps)
            if runs is None:
                rejected.extend(
                    Rejection(h.label, series_uid, f"series has gaps (gap_policy reject: {detail})")
                    for h in slices
                )
                continue
            findings.append(f"{len(gaps)} gap(s), {len(runs)} part(s) ({gap_policy}): {detail}")
        assert runs is not None  # only the reject policy returns None, and only with gaps
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

    if image_size is None and plans:
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
        plans = keep
    return sorted(plans, key=lambda p: p.sort_key), rejected


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


# --------------------------------------------------------------------------- pixels


@dataclass
class SeriesResult:
    """The converted slices of one series, plus the files whose pixels failed."""

    images: np.ndarray  # (n, C, H, W) stored dtype; (0, ...) once encoded into chunks
    meta: dict[str, list[Any]] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)
    #: Per slice, (filter mask, bytes) of its HDF5 chunk, compressed in the worker.
    chunks: list[tuple[int, bytes]] | None = None

    def __len__(self) -> int:
        return len(self.images) if self.chunks is None else len(self.chunks)


def _blosc_chunks(images: np.ndarray) -> list[tuple[int, bytes]]:
    """Blosc frames as the HDF5 Blosc filter (id 32001) stores them: that filter
    keeps the plain Blosc buffer of the chunk, so python-blosc's output is a
    chunk that hdf5plugin's filter decodes (a test checks it)."""
    import blosc

    blosc.set_nthreads(1)  # one core per worker; python-blosc defaults to all
    typesize = images.dtype.itemsize
    out = []
    for chunk in images:
        chunk = np.ascontiguousarray(chunk)
        out.append(
            (
                0,
                blosc.compress_ptr(
                    chunk.ctypes.data,
                    chunk.size,
                    typesize=typesize,
                    clevel=BLOSC["clevel"],
                    shuffle=BLOSC["shuffle"],
                    cname=BLOSC["cname"],
                ),
            )
        )
    return out


def _filtered_chunks(images: np.ndarray, compression: str) -> list[tuple[int, bytes]]:
    """Any filter: run it on an in-memory HDF5 file and read the chunks back, with
    their filter masks (LZF, an optional filter, skips chunks it cannot shrink)."""
    name = f"medssl-chunks-{os.getpid()}-{id(images)}"
    with h5py.File(name, "w", driver="core", backing_store=False) as scratch:
        dataset = scratch.create_dataset(
            IMAGES, data=images, chunks=(1, *images.shape[1:]), **COMPRESSION[compression]
        )
        return [dataset.id.read_direct_chunk((i, 0, 0, 0)) for i in range(len(images))]


#: How a worker turns slices into stored chunk bytes, per ``compression``; the
#: in-memory file serves filters without a direct encoder (LZF).
CHUNK_ENCODERS: dict[str, Callable[[np.ndarray], list[tuple[int, bytes]]]] = {
    "blosc": _blosc_chunks,
    "none": lambda images: [(0, np.ascontiguousarray(chunk).tobytes()) for chunk in images],
}


def encode_chunks(images: np.ndarray, compression: str) -> list[tuple[int, bytes]]:
    """Each slice of (n, C, H, W) as (filter mask, bytes) of its one-slice HDF5 chunk.

    Workers compress their own series this way, so compression runs in
    parallel and half the bytes cross the process boundary; the writer only
    places chunks (``write_direct_chunk``). Encoding directly with the codec
    spares the in-memory HDF5 file, whose fresh buffers for every task cost
    more in page faults than the compression itself.
    """
    encoder = CHUNK_ENCODERS.get(compression)
    return encoder(images) if encoder else _filtered_chunks(images, compression)


def process_series(
    plan: SeriesPlan,
    intensity: Intensity,
    image_size: int | None,
    compression: str | None = None,
) -> SeriesResult:
    """One series (or part of one) as a single result for a worker: its blocks joined, and
    with ``compression`` encoded into chunks (:func:`encode_chunks`) block by block,
    so a worker never holds the series uncompressed."""
    chunks: list[tuple[int, bytes]] = []
    parts: list[SeriesResult] = []
    for block in iter_blocks(plan, intensity, image_size):
        if compression is not None:
            chunks.extend(encode_chunks(block.images, compression))
            block = SeriesResult(block.images[:0], block.meta, block.rejected)
        else:
            block = SeriesResult(block.images.copy(), block.meta, block.rejected)
        parts.append(block)
    meta: dict[str, list[Any]] = {name: [] for name in _META_COLUMNS}
    for part in parts:
        for name, values in part.meta.items():
            meta[name].extend(values)
    return SeriesResult(
        np.concatenate([part.images for part in parts]),
        meta,
        [r for part in parts for r in part.rejected],
        chunks if compression is not None else None,
    )


def iter_blocks(
    plan: SeriesPlan,
    intensity: Intensity,
    image_size: int | None,
    block: int | None = None,
) -> Iterator[SeriesResult]:
    """Decode, convert to HU, resize and apply the intensity policy, ``block`` slices
    at a time (default :data:`SLICES_PER_BLOCK`).

    The blocks are views of one buffer that is refilled for the next block, so
    a consumer must store a block before asking for the next. Reusing the
    buffer keeps memory to one block per series and spares the page faults of
    a fresh series-sized array (a third of the per-slice time at 512 x 512).
    Every step is per slice, so blocking does not change the result.
    """
    block = block or SLICES_PER_BLOCK
    first = plan.slices[0]
    out_h, out_w = (image_size, image_size) if image_size else (first.rows, first.columns)
    size = min(block, len(plan.slices))
    buffer = np.empty((size, intensity.n_channels, out_h, out_w), intensity.numpy_dtype)
    for start in range(0, len(plan.slices), block):
        kept: list[tuple[SliceHeader, float]] = []
        rejected: list[Rejection] = []
        stop = start + block
        for header, z in zip(plan.slices[start:stop], plan.z[start:stop], strict=True):
            try:
                hu = read_slice_hu(header)
            except ValueError as err:
                rejected.append(Rejection(header.label, plan.series_uid, str(err)))
                continue
            except Exception as err:  # I/O or decoder failures of every kind
                reason = f"unreadable or truncated file ({type(err).__name__}: {err})"
                rejected.append(Rejection(header.label, plan.series_uid, reason))
                continue
            buffer[len(kept)] = intensity.apply(resize(hu[None], image_size))[0]
            kept.append((header, z))

        meta: dict[str, list[Any]] = {name: [] for name in _META_COLUMNS}
        for header, z in kept:
            meta["patient_id"].append(plan.patient_id)
            meta["study_uid"].append(plan.study_uid)
            meta["series_uid"].append(plan.series_uid)
            meta["sop_uid"].append(header.sop_uid)
            meta["source_file"].append(header.label)
            meta["slice_index"].append(-1)  # numbered by the writer, across blocks
            meta["z"].append(z)
            meta["spacing"].append(
                (
                    header.pixel_spacing[0] * header.rows / out_h,
                    header.pixel_spacing[1] * header.columns / out_w,
                    plan.slice_spacing,
                )
            )
        yield SeriesResult(buffer[: len(kept)], meta, rejected)


def _scan(
    root: Path, modalities: Sequence[str], pool: ProcessPoolExecutor | None, workers: int
) -> tuple[int, list[SliceHeader | Rejection]]:
    """Header pass over every file, in parallel when a pool is given.

    Returns the number of files and one entry per image: a single-frame file or
    a rejected file is one image, a multi-frame file one image per frame.
    """
    paths = list(iter_files(root))
    if pool is None:
        results = [read_header(p, root, modalities) for p in paths]
    else:
        chunk = max(1, min(256, len(paths) // (4 * workers)))
        results = list(
            pool.map(
                read_header,
                paths,
                [root] * len(paths),
                [tuple(modalities)] * len(paths),
                chunksize=chunk,
            )
        )
    items: list[SliceHeader | Rejection] = []
    for result in results:
        items.extend(result if isinstance(result, list) else [result])
    return len(paths), items


def _ordered_results(
    plans: Sequence[SeriesPlan],
    intensity: Intensity,
    image_size: int | None,
    pool: ProcessPoolExecutor | None,
    workers: int,
    compression: str,
) -> Iterator[SeriesResult]:
    """Series results in plan order, with at most a few series in flight per worker.

    Workers hand back compressed chunks; one process alone writes plain arrays
    (encoding first would only add a copy).
    """
    if pool is None:
        for plan in plans:
            yield from iter_blocks(plan, intensity, image_size)
        return
    pending: deque[Future[SeriesResult]] = deque()
    upcoming = (part for plan in plans for part in plan.parts(SLICES_PER_TASK))
    limit = PREFETCH_PER_WORKER * workers
    for plan in upcoming:
        pending.append(pool.submit(process_series, plan, intensity, image_size, compression))
        if len(pending) >= limit:
            break
    while pending:
        result = pending.popleft().result()
        nxt = next(upcoming, None)
        if nxt is not None:
            pending.append(pool.submit(process_series, nxt, intensity, image_size, compression))
        yield result


# --------------------------------------------------------------------------- driver


def convert(
    dicom_dir: str | os.PathLike[str],
    out_h5: str | os.PathLike[str],
    rejects_csv: str | os.PathLike[str],
    settings: dict[str, Any] | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Convert a DICOM folder; write the HDF5 dataset and the rejects CSV; return a summary.

    Raises :class:`NoUsableImagesError` (after writing the rejects CSV) when no
    slice survives, and ``FileNotFoundError`` when the folder does not exist.
    """
    cfg = resolve_settings(settings)
    intensity = Intensity.from_settings(cfg["intensity"])
    image_size = cfg["image_size"]
    root = Path(dicom_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: DICOM folder does not exist")
    started = time.perf_counter()
    workers = max(1, int(threads))
    pool = ProcessPoolExecutor(workers, mp_context=_pool_context()) if workers > 1 else None
    try:
        n_files, scanned = _scan(root, cfg["modalities"], pool, workers)
        headers = [h for h in scanned if isinstance(h, SliceHeader)]
        rejected = [r for r in scanned if isinstance(r, Rejection)]
        key_env = cfg["pseudonym_key_env"]
        plans, series_rejects = plan_series(
            headers,
            image_size,
            cfg["gap_policy"],
            float(cfg["gap_tolerance"]),
            os.environ[key_env].encode("utf-8") if key_env else None,
            cfg["tilt_policy"],
        )
        rejected.extend(series_rejects)
        findings = {p.series_uid.split("#")[0]: p.findings for p in plans if p.findings}
        n_seen = len(scanned)
        try:
            with atomic_path(out_h5) as tmp:
                counts = _write_h5(
                    tmp, plans, intensity, image_size, pool, workers, rejected, cfg["compression"]
                )
                n_converted, n_series = counts
                _finish_attrs(tmp, cfg, n_files, n_seen, n_converted, rejected, n_series, findings)
                if n_converted == 0:
                    raise NoUsableImagesError(
                        f"{root}: no usable images ({n_seen} files seen, all rejected; "
                        f"reasons in {rejects_csv})"
                    )
                _check_reject_fraction(root, rejects_csv, n_seen, len(rejected), cfg)
        finally:
            _write_rejects(rejects_csv, rejected)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    n_rejected = len(rejected)
    assert n_seen == n_converted + n_rejected, (n_seen, n_converted, n_rejected)
    reasons = reason_counts(rejected)
    summary = {
        "dicom_dir": str(root),
        "out": str(out_h5),
        "files_seen": n_files,
        "images_seen": n_seen,
        "converted": n_converted,
        "rejected": n_rejected,
        "series": n_series,
        "reasons": reasons,
        "findings": findings,
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info(
        "%s: %d files, %d images seen = %d converted + %d rejected; %d series -> %s in %.1f s",
        root,
        n_files,
        n_seen,
        n_converted,
        n_rejected,
        n_series,
        out_h5,
        summary["seconds"],
    )
    for reason, count in summary["reasons"].items():
        log.info("  rejected %d: %s", count, reason)
    for series_uid, notes in findings.items():
        log.warning("  series %s: %s", series_uid, "; ".join(notes))
    return summary


def _pool_context() -> multiprocessing.context.BaseContext:
    """How worker processes start: ``fork`` when this process runs no other Python
    thread, else ``forkserver``.

    A forked worker starts in milliseconds with every module already imported;
    a forkserver starts a fresh interpreter that imports numpy, h5py and
    pydicom first (5 s on the loaded development machine, a fifth of a 5,000-slice
    conversion). Forking a process with running threads can deadlock the child,
    so then the server is used, preloading this module once for all workers.
    The pool is created before any HDF5 file is open.
    """
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__ if __name__ != "__main__" else "medssl.datasets.conversion"])
    return context


def reason_counts(rejected: Sequence[Rejection]) -> dict[str, int]:
    """Rejections per reason, with the file-specific detail in parentheses dropped."""
    return dict(sorted(Counter(r.reason.split(" (")[0] for r in rejected).items()))


def _check_reject_fraction(
    root: Path, rejects_csv: Any, n_seen: int, n_rejected: int, cfg: dict[str, Any]
) -> None:
    """Fail (inside the atomic write, so no HDF5 is left) above ``max_reject_fraction``."""
    limit = cfg["max_reject_fraction"]
    if limit is None or n_seen == 0:
        return
    fraction = n_rejected / n_seen
    if fraction > limit:
        raise TooManyRejectsError(
            f"{root}: {n_rejected} of {n_seen} files rejected ({fraction:.1%}), more than "
            f"max_reject_fraction {limit:.1%}; reasons in {rejects_csv}"
        )


def _write_h5(
    path: Path,
    plans: Sequence[SeriesPlan],
    intensity: Intensity,
    image_size: int | None,
    pool: ProcessPoolExecutor | None,
    workers: int,
    rejected: list[Rejection],
    compression: str = "blosc",
) -> tuple[int, int]:
    """Append each series' slices as results arrive; return (slices, series) written."""
    if image_size is not None:
        height = width = image_size
    elif plans:
        height, width = plans[0].slices[0].rows, plans[0].slices[0].columns
    else:
        height = width = 1  # nothing to convert: the file is discarded by the caller
    channels = intensity.n_channels
    meta: dict[str, list[Any]] = defaultdict(list)
    n_rows = 0
    written: Counter[str] = Counter()  # slices written per series
    with h5py.File(path, "w") as handle:
        images = handle.create_dataset(
            IMAGES,
            shape=(0, channels, height, width),
            maxshape=(None, channels, height, width),
            dtype=intensity.numpy_dtype,
            chunks=(1, channels, height, width),
            **COMPRESSION[compression],
        )
        images.attrs["compression"] = compression
        images.attrs["policy"] = intensity.policy
        images.attrs["scale"] = intensity.scale
        images.attrs["offset"] = intensity.offset
        images.attrs["channels"] = json.dumps(intensity.channels())
        results = _ordered_results(plans, intensity, image_size, pool, workers, compression)
        for result in results:
            rejected.extend(result.rejected)
            count = len(result)
            if count == 0:
                continue
            images.resize(n_rows + count, axis=0)
            if result.chunks is None:
                images[n_rows : n_rows + count] = result.images
            else:
                for k, (mask, chunk) in enumerate(result.chunks):
                    images.id.write_direct_chunk((n_rows + k, 0, 0, 0), chunk, mask)
            n_rows += count
            # Numbered here, not by the producer: a series arrives in several
            # blocks or tasks, and a slice that failed to decode leaves no gap.
            series = result.meta["series_uid"][0]
            first = written[series]
            result.meta["slice_index"] = list(range(first, first + count))
            written[series] += count
            for name, values in result.meta.items():
                meta[name].extend(values)
            fault_point("convert.series_written")

        n_series = len(written)
        group = handle.create_group(META)
        text = h5py.string_dtype("utf-8")
        for name in STRING_META:
            group.create_dataset(name, data=np.array(meta[name], dtype=object), dtype=text)
        group.create_dataset("slice_index", data=np.asarray(meta["slice_index"], dtype=np.int32))
        group.create_dataset("z", data=np.asarray(meta["z"], dtype=np.float64))
        group.create_dataset(
            "spacing", data=np.asarray(meta["spacing"], dtype=np.float32).reshape(-1, 3)
        )
    return n_rows, n_series


def _finish_attrs(
    path: Path,
    settings: dict[str, Any],
    n_files: int,
    n_seen: int,
    n_converted: int,
    rejected: Sequence[Rejection],
    n_series: int,
    findings: dict[str, list[str]],
) -> None:
    """Root attributes: provenance, the file accounting and the geometry findings."""
    with h5py.File(path, "a") as handle:
        handle.attrs["provenance"] = json.dumps(record("convert", settings), default=str)
        handle.attrs["n_files_seen"] = n_files
        handle.attrs["n_images_seen"] = n_seen
        handle.attrs["n_converted"] = n_converted
        handle.attrs["n_rejected"] = len(rejected)
        handle.attrs["n_series"] = n_series
        handle.attrs["reject_reasons"] = json.dumps(reason_counts(rejected))
        handle.attrs["series_findings"] = json.dumps(findings)


def _write_rejects(path: str | os.PathLike[str], rejected: Sequence[Rejection]) -> None:
    """The rejects CSV, sorted by file; header only when nothing was rejected."""
    # Imported here: pandas is the slowest import of this module (about a second),
    # and every worker process would pay it for nothing.
    import pandas as pd

    frame = pd.DataFrame(
        [(r.file, r.series_uid, r.reason) for r in rejected], columns=list(REJECT_COLUMNS)
    ).sort_values("file", kind="stable")
    write_csv(path, frame)


#: Standalone defaults: the data as stored, nothing lost (the pipeline passes
#: its own settings from config.yaml instead).
STANDALONE_DEFAULTS: dict[str, Any] = {"intensity": {"policy": "hu"}, "image_size": None}

LAYOUT_HELP = """\
HDF5 layout (one file per dataset):
  /images              (N, C, H, W), one chunk per slice, Blosc (LZ4) via
                       hdf5plugin (import hdf5plugin to read), or LZF/none;
                       int16 HU (policy hu, default), float16 HU, or uint8
                       (window / minmax). Attributes: policy, scale, offset
                       (model input = stored * scale + offset), channels (JSON),
                       compression.
  /meta/patient_id     (N,) UTF-8, DICOM PatientID (or its keyed hash)
  /meta/study_uid      (N,) UTF-8, StudyInstanceUID
  /meta/series_uid     (N,) UTF-8, SeriesInstanceUID (+ "#k" for parts split at gaps)
  /meta/sop_uid        (N,) UTF-8, SOPInstanceUID
  /meta/source_file    (N,) UTF-8, path relative to SRC_DIR
  /meta/slice_index    (N,) int32, position in the sorted series
  /meta/z              (N,) float64, mm along the slice normal
  /meta/spacing        (N, 3) float32, mm: row, column, slice
  root attributes      provenance (JSON: version, settings), n_files_seen,
                       n_converted, n_rejected, n_series, reject_reasons
                       (JSON), series_findings (JSON: gaps, gantry tilt)
Rows are ordered by patient, study, series, position. Every file found is
converted or listed in the rejects CSV (file, series_uid, reason).
"""


def _cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Settings from --settings (or the standalone defaults), then the single options."""
    settings = copy.deepcopy(STANDALONE_DEFAULTS if args.settings is None else args.settings)
    intensity = settings.setdefault("intensity", {})
    if args.policy is not None:
        intensity.clear()
        intensity["policy"] = args.policy
    if args.window:
        intensity["windows"] = [{"center": c, "width": w} for c, w in args.window]
    if args.dtype is not None:
        intensity["dtype"] = args.dtype
    names = ("modalities", "gap_policy", "gap_tolerance", "tilt_policy", "max_reject_fraction")
    for name in (*names, "compression"):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if args.image_size is not None:
        settings["image_size"] = None if args.image_size == "native" else int(args.image_size)
    if args.pseudonym_key_env is not None:
        settings["pseudonym_key_env"] = args.pseudonym_key_env
    return settings


def _window(text: str) -> tuple[float, float]:
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"window must be CENTER,WIDTH, got {text!r}") from err
    return center, width


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` is the reference for options and layout."""
    from medssl.cli import json_arg

    parser = argparse.ArgumentParser(
        prog="python -m medssl.convert",
        description=(
            "Convert a folder of DICOM files (any nesting, any names) into one HDF5 "
            "dataset. Defaults: CT only, raw HU as int16, native size, gaps split. "
            "Writes OUT.rejects.csv beside OUT.h5 unless --rejects is given."
        ),
        epilog=LAYOUT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", nargs="?", type=Path, help="DICOM folder (SRC_DIR)")
    parser.add_argument("out_h5", nargs="?", type=Path, help="HDF5 file to write (OUT.h5)")
    parser.add_argument("--dicom-dir", type=Path, help="same as SRC_DIR")
    parser.add_argument("--out", type=Path, help="same as OUT.h5")
    parser.add_argument("--rejects", type=Path, help="rejects CSV (default OUT.rejects.csv)")
    parser.add_argument(
        "--settings",
        type=json_arg,
        default=None,
        help="JSON object of the data.convert config section; replaces the standalone "
        "defaults, the options below then override single keys",
    )
    parser.add_argument("--modalities", nargs="+", help="modalities to keep (default CT)")
    parser.add_argument("--policy", choices=POLICIES, help="intensity policy (default hu)")
    parser.add_argument(
        "--window",
        type=_window,
        action="append",
        metavar="CENTER,WIDTH",
        help="HU window for policy window, one channel each; repeatable",
    )
    parser.add_argument("--dtype", choices=("int16", "float16"), help="HU dtype (default int16)")
    parser.add_argument("--image-size", help="output size in pixels, or 'native' (default native)")
    parser.add_argument(
        "--gap-policy",
        choices=sorted(GAP_POLICIES),
        help="series whose slice steps deviate from the median: split into parts "
        "(default), reject the series, or keep and only report",
    )
    parser.add_argument(
        "--gap-tolerance",
        type=float,
        help=f"relative deviation from the median step that is a gap "
        f"(default {DEFAULT_GAP_TOLERANCE})",
    )
    parser.add_argument(
        "--tilt-policy",
        choices=TILT_POLICIES,
        help=f"series with gantry tilt (stacked more than {TILT_TOLERANCE_DEG} deg off the "
        "slice normal): convert and report (default), or reject",
    )
    parser.add_argument(
        "--max-reject-fraction",
        type=float,
        help="fail (no HDF5 written) when more than this fraction of files is rejected",
    )
    parser.add_argument(
        "--pseudonym-key-env",
        metavar="VAR",
        help="store HMAC-SHA256 pseudonyms of PatientID keyed by this environment variable",
    )
    parser.add_argument(
        "--compression", choices=sorted(COMPRESSION), help="HDF5 filter (default blosc)"
    )
    parser.add_argument("--threads", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``--help`` documents it)."""
    from medssl.cli import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    src = args.dicom_dir or args.src
    out = args.out or (args.out_h5 if args.dicom_dir is None else args.src)
    if src is None or out is None:
        parser.error("give SRC_DIR and OUT.h5 (or --dicom-dir and --out)")
    rejects = args.rejects or out.with_name(out.stem + ".rejects.csv")
    setup_logging(args.verbose)
    try:
        settings = _cli_settings(args)
        convert(src, out, rejects, settings, threads=args.threads)
    except (NoUsableImagesError, TooManyRejectsError, FileNotFoundError, ValueError) as err:
        print(f"medssl.datasets.conversion: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
