"""DICOM folder -> one HDF5 dataset in the layout of :mod:`medssl.data`.

Every file found is either converted or listed in the rejects CSV with a reason
(``files seen = converted + rejected`` is checked), because a benchmark that
silently loses slices cannot be audited. The work happens in three passes:

1. headers only (``stop_before_pixels``): readability, SOP class, required
   tags, modality, localizers;
2. per series: majority orientation and shape, sort along the slice normal
   (never by InstanceNumber or file name), drop duplicate positions;
3. pixels, one series at a time (in worker processes when ``--threads`` > 1):
   decode, HU, resize, intensity policy; written in output order as results
   arrive, so memory holds a few series, never the dataset.

Command line::

    python -m medssl.convert --dicom-dir DIR --out H5 --rejects CSV --settings JSON [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from medssl.dicom import Rejection, SliceHeader, iter_files, orientation_key, read_header, read_hu
from medssl.io import atomic_path, write_csv
from medssl.provenance import record

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "modalities": ["CT"],
    "intensity": {"policy": "window", "windows": [{"center": -300, "width": 1600}]},
    "image_size": 64,
}
POLICIES = ("hu", "window", "minmax")
REJECT_COLUMNS = ("file", "series_uid", "reason")
#: Two slices of a series closer than this along the normal are the same position.
DUPLICATE_TOLERANCE_MM = 0.01
#: The layout of :mod:`medssl.data`, spelled out here because importing that
#: module loads torch (seconds and ~900 MB per process) for three names; a test
#: checks that the two agree.
IMAGES = "images"
META = "meta"
STRING_META = ("patient_id", "study_uid", "series_uid", "sop_uid", "source_file")
_META_COLUMNS = (*STRING_META, "slice_index", "z", "spacing")
#: Series in flight per worker: enough to keep workers busy, small enough to bound memory.
PREFETCH_PER_WORKER = 2


class NoUsableImagesError(RuntimeError):
    """Nothing in the folder could be converted; the message names the folder."""


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
        """(n, H, W) HU -> (n, C, H, W) stored values."""
        if self.policy == "hu":
            if self.dtype == "int16":
                out = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
            else:
                out = hu.astype(np.float16)
            return out[:, None]
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
    return resolved


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

    @property
    def sort_key(self) -> tuple[str, str, str]:
        return (self.patient_id, self.study_uid, self.series_uid)


def _majority(values: Iterable[Any]) -> Any:
    """Most frequent value; ties go to the smallest, so the choice is reproducible."""
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


def plan_series(
    headers: Sequence[SliceHeader], image_size: int | None
) -> tuple[list[SeriesPlan], list[Rejection]]:
    """Group headers into series, apply the series-level checks, sort slices.

    With ``image_size`` null every slice keeps its native size, so series whose
    shape differs from the dataset's most common shape cannot share the array
    and are rejected whole.
    """
    rejected: list[Rejection] = []
    by_series: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        by_series[header.series_uid].append(header)

    plans: list[SeriesPlan] = []
    for series_uid, members in by_series.items():
        members = sorted(members, key=lambda h: h.file)
        majority = _majority(orientation_key(h.orientation) for h in members)
        kept = []
        for h in members:
            if orientation_key(h.orientation) != majority:
                rejected.append(
                    Rejection(
                        h.file,
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
                        h.file,
                        series_uid,
                        f"shape {h.rows}x{h.columns} differs from series majority "
                        f"{shape[0]}x{shape[1]}",
                    )
                )
            else:
                kept.append(h)
        ordered = sorted(kept, key=lambda h: (h.z, h.file))
        slices: list[SliceHeader] = []
        for h in ordered:
            if slices and abs(h.z - slices[-1].z) < DUPLICATE_TOLERANCE_MM:
                rejected.append(
                    Rejection(
                        h.file,
                        series_uid,
                        f"duplicate position z={h.z:.3f} mm in series (same as {slices[-1].file})",
                    )
                )
            else:
                slices.append(h)
        z = [h.z for h in slices]
        plans.append(
            SeriesPlan(
                series_uid=series_uid,
                patient_id=_majority(h.patient_id for h in slices),
                study_uid=_majority(h.study_uid for h in slices),
                slices=slices,
                z=z,
                slice_spacing=_slice_spacing(slices, z),
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
                    h.file,
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

    images: np.ndarray  # (n, C, H, W) stored dtype
    meta: dict[str, list[Any]] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)


def process_series(plan: SeriesPlan, intensity: Intensity, image_size: int | None) -> SeriesResult:
    """Decode, convert to HU, resize and apply the intensity policy for one series."""
    hus: list[np.ndarray] = []
    kept: list[tuple[SliceHeader, float]] = []
    rejected: list[Rejection] = []
    for header, z in zip(plan.slices, plan.z, strict=True):
        try:
            hu = read_hu(header.path, header.rows, header.columns)
        except ValueError as err:
            rejected.append(Rejection(header.file, plan.series_uid, str(err)))
            continue
        except Exception as err:  # I/O or decoder failures of every kind
            reason = f"unreadable or truncated file ({type(err).__name__}: {err})"
            rejected.append(Rejection(header.file, plan.series_uid, reason))
            continue
        hus.append(hu)
        kept.append((header, z))

    meta: dict[str, list[Any]] = {name: [] for name in _META_COLUMNS}
    if not kept:
        shape = (0, intensity.n_channels, image_size or 0, image_size or 0)
        return SeriesResult(np.zeros(shape, intensity.numpy_dtype), meta, rejected)

    stack = resize(np.stack(hus), image_size)
    images = intensity.apply(stack)
    out_h, out_w = stack.shape[1:]
    for index, (header, z) in enumerate(kept):
        meta["patient_id"].append(plan.patient_id)
        meta["study_uid"].append(plan.study_uid)
        meta["series_uid"].append(plan.series_uid)
        meta["sop_uid"].append(header.sop_uid)
        meta["source_file"].append(header.file)
        meta["slice_index"].append(index)
        meta["z"].append(z)
        meta["spacing"].append(
            (
                header.pixel_spacing[0] * header.rows / out_h,
                header.pixel_spacing[1] * header.columns / out_w,
                plan.slice_spacing,
            )
        )
    return SeriesResult(images, meta, rejected)


def _scan(
    root: Path, modalities: Sequence[str], pool: ProcessPoolExecutor | None, workers: int
) -> list[SliceHeader | Rejection]:
    """Header pass over every file, in parallel when a pool is given."""
    paths = list(iter_files(root))
    if pool is None:
        return [read_header(p, root, modalities) for p in paths]
    chunk = max(1, min(256, len(paths) // (4 * workers)))
    return list(
        pool.map(
            read_header,
            paths,
            [root] * len(paths),
            [tuple(modalities)] * len(paths),
            chunksize=chunk,
        )
    )


def _ordered_results(
    plans: Sequence[SeriesPlan],
    intensity: Intensity,
    image_size: int | None,
    pool: ProcessPoolExecutor | None,
    workers: int,
) -> Iterator[SeriesResult]:
    """Series results in plan order, with at most a few series in flight per worker."""
    if pool is None:
        for plan in plans:
            yield process_series(plan, intensity, image_size)
        return
    pending: deque[Future[SeriesResult]] = deque()
    upcoming = iter(plans)
    limit = PREFETCH_PER_WORKER * workers
    for plan in upcoming:
        pending.append(pool.submit(process_series, plan, intensity, image_size))
        if len(pending) >= limit:
            break
    while pending:
        result = pending.popleft().result()
        nxt = next(upcoming, None)
        if nxt is not None:
            pending.append(pool.submit(process_series, nxt, intensity, image_size))
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
    pool = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
        if workers > 1
        else None
    )
    try:
        scanned = _scan(root, cfg["modalities"], pool, workers)
        headers = [h for h in scanned if isinstance(h, SliceHeader)]
        rejected = [r for r in scanned if isinstance(r, Rejection)]
        plans, series_rejects = plan_series(headers, image_size)
        rejected.extend(series_rejects)
        n_seen = len(scanned)
        try:
            with atomic_path(out_h5) as tmp:
                counts = _write_h5(tmp, plans, intensity, image_size, pool, workers, rejected)
                n_converted, n_series = counts
                _finish_attrs(tmp, cfg, n_seen, n_converted, len(rejected), n_series)
                if n_converted == 0:
                    raise NoUsableImagesError(
                        f"{root}: no usable images ({n_seen} files seen, all rejected; "
                        f"reasons in {rejects_csv})"
                    )
        finally:
            _write_rejects(rejects_csv, rejected)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    n_rejected = len(rejected)
    assert n_seen == n_converted + n_rejected, (n_seen, n_converted, n_rejected)
    reasons = Counter(r.reason.split(" (")[0] for r in rejected)
    summary = {
        "dicom_dir": str(root),
        "out": str(out_h5),
        "files_seen": n_seen,
        "converted": n_converted,
        "rejected": n_rejected,
        "series": n_series,
        "reasons": dict(sorted(reasons.items())),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info(
        "%s: %d files seen = %d converted + %d rejected; %d series -> %s in %.1f s",
        root,
        n_seen,
        n_converted,
        n_rejected,
        n_series,
        out_h5,
        summary["seconds"],
    )
    for reason, count in summary["reasons"].items():
        log.info("  rejected %d: %s", count, reason)
    return summary


def _write_h5(
    path: Path,
    plans: Sequence[SeriesPlan],
    intensity: Intensity,
    image_size: int | None,
    pool: ProcessPoolExecutor | None,
    workers: int,
    rejected: list[Rejection],
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
    n_rows = n_series = 0
    with h5py.File(path, "w") as handle:
        images = handle.create_dataset(
            IMAGES,
            shape=(0, channels, height, width),
            maxshape=(None, channels, height, width),
            dtype=intensity.numpy_dtype,
            chunks=(1, channels, height, width),
            compression="lzf",
        )
        images.attrs["policy"] = intensity.policy
        images.attrs["scale"] = intensity.scale
        images.attrs["offset"] = intensity.offset
        images.attrs["channels"] = json.dumps(intensity.channels())
        for result in _ordered_results(plans, intensity, image_size, pool, workers):
            rejected.extend(result.rejected)
            count = len(result.images)
            if count == 0:
                continue
            images.resize(n_rows + count, axis=0)
            images[n_rows : n_rows + count] = result.images
            n_rows += count
            n_series += 1
            for name, values in result.meta.items():
                meta[name].extend(values)

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
    n_seen: int,
    n_converted: int,
    n_rejected: int,
    n_series: int,
) -> None:
    """Root attributes: provenance and the file accounting."""
    with h5py.File(path, "a") as handle:
        handle.attrs["provenance"] = json.dumps(record("convert", settings), default=str)
        handle.attrs["n_files_seen"] = n_seen
        handle.attrs["n_converted"] = n_converted
        handle.attrs["n_rejected"] = n_rejected
        handle.attrs["n_series"] = n_series


def _write_rejects(path: str | os.PathLike[str], rejected: Sequence[Rejection]) -> None:
    """The rejects CSV, sorted by file; header only when nothing was rejected."""
    frame = pd.DataFrame(
        [(r.file, r.series_uid, r.reason) for r in rejected], columns=list(REJECT_COLUMNS)
    ).sort_values("file", kind="stable")
    write_csv(path, frame)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    from medssl.cli import json_arg, setup_logging

    parser = argparse.ArgumentParser(
        prog="python -m medssl.convert", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dicom-dir", required=True, type=Path, help="folder to scan recursively")
    parser.add_argument("--out", required=True, type=Path, help="HDF5 file to write")
    parser.add_argument("--rejects", required=True, type=Path, help="rejects CSV to write")
    parser.add_argument("--settings", type=json_arg, default={}, help="JSON settings")
    parser.add_argument("--threads", type=int, default=1, help="worker processes")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        convert(args.dicom_dir, args.out, args.rejects, args.settings, threads=args.threads)
    except (NoUsableImagesError, FileNotFoundError) as err:
        print(f"medssl.convert: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
