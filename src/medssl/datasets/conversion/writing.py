"""The single writer: series results into ``/images`` and ``/meta``, root attributes,
and the rejects CSV.

One process writes, in plan order, as results arrive; memory holds a few
results, never the dataset.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from medssl.core.faults import fault_point
from medssl.core.files import write_csv
from medssl.core.provenance import record
from medssl.datasets.conversion.intensity import Intensity
from medssl.datasets.conversion.layout import (
    GEOMETRY_META,
    IMAGES,
    META,
    REJECT_COLUMNS,
    STRING_META,
)
from medssl.datasets.conversion.pixels import SeriesResult
from medssl.datasets.conversion.settings import COMPRESSION
from medssl.dicom.reading import Rejection


def write_images(
    path: Path,
    results: Iterable[SeriesResult],
    intensity: Intensity,
    shape: tuple[int, int],
    compression: str,
    rejected: list[Rejection],
) -> tuple[int, int]:
    """Append each result's slices (H x W = ``shape``) and metadata; return (slices, series).

    The files a result could not decode are added to ``rejected``.
    """
    meta: dict[str, list[Any]] = defaultdict(list)
    n_rows = 0
    written: Counter[str] = Counter()  # slices written per series
    with h5py.File(path, "w") as handle:
        images = _create_images(handle, intensity, shape, compression)
        for result in results:
            rejected.extend(result.rejected)
            count = len(result)
            if count == 0:
                continue
            _append(images, n_rows, result)
            n_rows += count
            # Numbered here, not by the producer: a series arrives in several
            # blocks or tasks, and a slice that failed to decode leaves no gap.
            # Row by row, because a result of flat images holds several series.
            numbers = []
            for series in result.meta["series_uid"]:
                numbers.append(written[series])
                written[series] += 1
            result.meta["slice_index"] = numbers
            for name, values in result.meta.items():
                meta[name].extend(values)
            fault_point("convert.series_written")
        _write_meta(handle, meta)
    return n_rows, len(written)


def _create_images(
    handle: h5py.File, intensity: Intensity, shape: tuple[int, int], compression: str
) -> h5py.Dataset:
    """The empty, growable ``/images`` with one chunk per slice and its attributes."""
    height, width = shape
    channels = intensity.n_channels
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
    return images


def _append(images: h5py.Dataset, n_rows: int, result: SeriesResult) -> None:
    """Grow ``/images`` by the result's slices: arrays written, or encoded chunks placed."""
    count = len(result)
    images.resize(n_rows + count, axis=0)
    if result.chunks is None:
        images[n_rows : n_rows + count] = result.images
    else:
        for k, (mask, chunk) in enumerate(result.chunks):
            images.id.write_direct_chunk((n_rows + k, 0, 0, 0), chunk, mask)


def _write_meta(handle: h5py.File, meta: dict[str, list[Any]]) -> None:
    """``/meta``: one column per name of the layout, one row per stored slice."""
    group = handle.create_group(META)
    text = h5py.string_dtype("utf-8")
    for name in STRING_META:
        group.create_dataset(name, data=np.array(meta[name], dtype=object), dtype=text)
    group.create_dataset("slice_index", data=np.asarray(meta["slice_index"], dtype=np.int32))
    group.create_dataset("z", data=np.asarray(meta["z"], dtype=np.float64))
    group.create_dataset(
        "spacing", data=np.asarray(meta["spacing"], dtype=np.float32).reshape(-1, 3)
    )
    for name in GEOMETRY_META:
        dtype = np.float32 if name == "scale" else np.int32
        group.create_dataset(name, data=np.asarray(meta[name], dtype=dtype).reshape(-1, 2))


def reason_counts(rejected: Sequence[Rejection]) -> dict[str, int]:
    """Rejections per reason, with the file-specific detail in parentheses dropped."""
    return dict(sorted(Counter(r.reason.split(" (")[0] for r in rejected).items()))


def write_root_attrs(
    path: Path,
    settings: dict[str, Any],
    n_files: int,
    n_seen: int,
    n_converted: int,
    rejected: Sequence[Rejection],
    n_series: int,
    findings: dict[str, list[str]],
    source: str = "dicom",
    extra: dict[str, str] | None = None,
) -> None:
    """Root attributes: provenance, the file accounting, the geometry findings, the source."""
    with h5py.File(path, "a") as handle:
        handle.attrs["provenance"] = json.dumps(record("convert", settings), default=str)
        handle.attrs["n_files_seen"] = n_files
        handle.attrs["n_images_seen"] = n_seen
        handle.attrs["n_converted"] = n_converted
        handle.attrs["n_rejected"] = len(rejected)
        handle.attrs["n_series"] = n_series
        handle.attrs["reject_reasons"] = json.dumps(reason_counts(rejected))
        handle.attrs["series_findings"] = json.dumps(findings)
        handle.attrs["source"] = source
        for key, value in (extra or {}).items():
            handle.attrs[key] = value


def write_rejects(path: str | os.PathLike[str], rejected: Sequence[Rejection]) -> None:
    """The rejects CSV, sorted by file; header only when nothing was rejected."""
    # Imported here: pandas is the slowest import of the conversion (about a second),
    # and every worker process would pay it for nothing.
    import pandas as pd

    frame = pd.DataFrame(
        [(r.file, r.series_uid, r.reason) for r in rejected], columns=list(REJECT_COLUMNS)
    ).sort_values("file", kind="stable")
    write_csv(path, frame)
