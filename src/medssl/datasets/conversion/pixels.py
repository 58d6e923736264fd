"""The pixel pass: decode, HU, resize and intensity policy, a block of slices at a time.

It runs in the worker processes (or in the one process without ``--threads``);
a file whose pixels fail is rejected here with the decoder's reason, so every
file still ends as a slice or a reject.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medssl.datasets.conversion.chunks import Chunk, encode_chunks
from medssl.datasets.conversion.intensity import Intensity
from medssl.datasets.conversion.layout import META_COLUMNS
from medssl.datasets.conversion.planning import SeriesPlan
from medssl.datasets.resizing import resize
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
    image_size: int | None,
    compression: str | None = None,
) -> SeriesResult:
    """One series (or part of one) as a single result for a worker: its blocks joined, and
    with ``compression`` encoded into chunks (:func:`encode_chunks`) block by block,
    so a worker never holds the series uncompressed."""
    chunks: list[Chunk] = []
    parts: list[SeriesResult] = []
    for block in iter_blocks(plan, intensity, image_size):
        if compression is not None:
            chunks.extend(encode_chunks(block.images, compression))
            block = SeriesResult(block.images[:0], block.meta, block.rejected)
        else:
            block = SeriesResult(block.images.copy(), block.meta, block.rejected)
        parts.append(block)
    meta: dict[str, list[Any]] = {name: [] for name in META_COLUMNS}
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

        yield SeriesResult(buffer[: len(kept)], _block_meta(plan, kept, out_h, out_w), rejected)


def _block_meta(
    plan: SeriesPlan, kept: list[tuple[SliceHeader, float]], out_h: int, out_w: int
) -> dict[str, list[Any]]:
    """The /meta columns of a block's slices; spacing is that of the stored pixels."""
    meta: dict[str, list[Any]] = {name: [] for name in META_COLUMNS}
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
    return meta
