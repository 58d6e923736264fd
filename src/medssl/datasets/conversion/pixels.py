"""The pixel pass: decode, HU, resize and intensity policy, a block of slices at a time.

It runs in the worker processes (or in the one process without ``--threads``);
a file whose pixels fail is rejected here with the decoder's reason, so every
file still ends as a slice or a reject.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medssl.datasets.conversion.chunks import Chunk, encode_chunks
from medssl.datasets.conversion.intensity import Intensity
from medssl.datasets.conversion.layout import META_COLUMNS
from medssl.datasets.conversion.planning import SeriesPlan
from medssl.datasets.resizing import Geometry, Grid, place_on_grid, resize_to
from medssl.dicom.reading import Rejection, SliceHeader, read_slice_hu

#: Slices decoded before they are written or compressed: 16 MB at 512 x 512 int16,
#: under glibc's largest mmap threshold (32 MB), so the buffer's pages are reused.
SLICES_PER_BLOCK = 32


@dataclass
class SeriesResult:
    """The converted slices of one series, plus the files whose pixels failed."""

    images: np.ndarray  # (n, C, H, W) stored dtype; (0, ...) once encoded into chunks
    meta: dict[str, list[Any]] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)
    #: Per slice, (filter mask, bytes) of its HDF5 chunk, compressed in the worker.
    chunks: list[Chunk] | None = None

    def __len__(self) -> int:
        return len(self.images) if self.chunks is None else len(self.chunks)


def process_series(
    plan: SeriesPlan,
    intensity: Intensity,
    grid: Grid,
    compression: str | None = None,
) -> SeriesResult:
    """One series (or part of one) as a single result for a worker: its blocks joined, and
    with ``compression`` encoded into chunks (:func:`encode_chunks`) block by block,
    so a worker never holds the series uncompressed."""
    chunks: list[Chunk] = []
    parts: list[SeriesResult] = []
    for block in iter_blocks(plan, intensity, grid):
        if compression is not None:
            chunks.extend(encode_chunks(block.images, compression))
            block = SeriesResult(block.images[:0], block.meta, block.rejected)
        else:
            block = SeriesResult(block.images.copy(), block.meta, block.rejected)
        parts.append(block)
    return join_results(parts, chunks if compression is not None else None)


def join_results(parts: list[SeriesResult], chunks: list[Chunk] | None = None) -> SeriesResult:
    """One result from consecutive blocks (their arrays, meta and rejects in order)."""
    meta: dict[str, list[Any]] = {name: [] for name in META_COLUMNS}
    for part in parts:
        for name, values in part.meta.items():
            meta[name].extend(values)
    return SeriesResult(
        np.concatenate([part.images for part in parts]),
        meta,
        [r for part in parts for r in part.rejected],
        chunks,
    )


def iter_blocks(
    plan: SeriesPlan,
    intensity: Intensity,
    grid: Grid,
    block: int | None = None,
) -> Iterator[SeriesResult]:
    """Decode, convert to HU, resample, apply the intensity policy and place on the
    dataset's grid (:func:`store_slice`), ``block`` slices at a time (default
    :data:`SLICES_PER_BLOCK`).

    The blocks are views of one buffer that is refilled for the next block, so
    a consumer must store a block before asking for the next. Reusing the
    buffer keeps memory to one block per series and spares the page faults of
    a fresh series-sized array (a third of the per-slice time at 512 x 512).
    Every step is per slice, so blocking does not change the result.
    """
    block = block or SLICES_PER_BLOCK
    size = min(block, len(plan.slices))
    buffer = np.empty((size, intensity.n_channels, *grid.stored), intensity.numpy_dtype)
    for start in range(0, len(plan.slices), block):
        kept: list[tuple[SliceHeader, float, Geometry]] = []
        rejected: list[Rejection] = []
        stop = start + block
        for header, z in zip(plan.slices[start:stop], plan.z[start:stop], strict=True):
            hu = read_or_reject(
                lambda h=header: read_slice_hu(h), header.label, plan.series_uid, rejected
            )
            if hu is None:
                continue
            geometry = grid.place((header.rows, header.columns), header.pixel_spacing)
            buffer[len(kept)] = store_slice(hu, geometry, intensity)
            kept.append((header, z, geometry))

        yield SeriesResult(buffer[: len(kept)], _block_meta(plan, kept), rejected)


def read_or_reject(
    read: Callable[[], np.ndarray], file: str, group: str, rejected: list[Rejection]
) -> np.ndarray | None:
    """The pixels ``read()`` decodes, or None with the reason appended to ``rejected``.

    A ``ValueError`` is a problem the reader could name, kept as its message;
    any other failure is an unreadable or truncated file, named by its type.
    Every source's pixel pass rejects this way, so a reason reads the same
    whichever format the file came in.
    """
    try:
        return read()
    except ValueError as err:
        rejected.append(Rejection(file, group, str(err)))
    except Exception as err:  # I/O or decoder failures of every kind
        reason = f"unreadable or truncated file ({type(err).__name__}: {err})"
        rejected.append(Rejection(file, group, reason))
    return None


def store_slice(native: np.ndarray, geometry: Geometry, intensity: Intensity) -> np.ndarray:
    """One native slice, (H, W) or (C, H, W), as its (C, *stored) row of ``/images``.

    The steps of :func:`medssl.datasets.resizing.to_stored_grid` with the
    intensity policy between them: resampled first (HU, as before any policy, so
    a window sees interpolated HU), then the policy, then placed on the grid
    with the policy's background (air for hu, 0 after windowing), so padding
    never enters a per-slice range (minmax). At native size with padding the
    native values are not resampled at all, so integer HU stay exact.
    """
    planes = native[None] if native.ndim == 2 else native
    resized = resize_to(planes, *geometry.resized)
    if not intensity.takes_hu and resized.dtype != planes.dtype:
        # Stored pixels stay in their integer type: resampled values rounded back.
        top = np.iinfo(planes.dtype).max
        resized = np.clip(np.rint(resized), 0, top).astype(planes.dtype)
    stored = intensity.apply(resized if native.ndim == 2 else resized[None])[0]
    return place_on_grid(stored, geometry, intensity.background)


def geometry_meta(meta: dict[str, list[Any]], geometry: Geometry) -> None:
    """Append one row's geometry columns (``/meta/original_shape`` ...)."""
    meta["original_shape"].append(geometry.original)
    meta["resized_shape"].append(geometry.resized)
    meta["pad_offset"].append(geometry.offset)
    meta["scale"].append(geometry.scale)


def _block_meta(
    plan: SeriesPlan, kept: list[tuple[SliceHeader, float, Geometry]]
) -> dict[str, list[Any]]:
    """The /meta columns of a block's slices; spacing is that of the stored pixels."""
    meta: dict[str, list[Any]] = {name: [] for name in META_COLUMNS}
    for header, z, geometry in kept:
        meta["patient_id"].append(plan.patient_id)
        meta["study_uid"].append(plan.study_uid)
        meta["series_uid"].append(plan.series_uid)
        meta["sop_uid"].append(header.sop_uid)
        meta["source_file"].append(header.label)
        meta["slice_index"].append(-1)  # numbered by the writer, across blocks
        meta["z"].append(z)
        meta["spacing"].append(
            (
                header.pixel_spacing[0] / geometry.scale[0],
                header.pixel_spacing[1] / geometry.scale[1],
                plan.slice_spacing,
            )
        )
        geometry_meta(meta, geometry)
    return meta
