"""Slices encoded into the bytes of their one-slice HDF5 chunks, in the worker processes.

Workers compress their own series, so compression runs in parallel and only
the compressed bytes cross the process boundary; the writer just places the
chunks (``write_direct_chunk``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import h5py
import numpy as np

from medssl.core.registry import Registry
from medssl.datasets.conversion.layout import IMAGES
from medssl.datasets.conversion.settings import BLOSC, COMPRESSION

#: One slice's chunk: (HDF5 filter mask, stored bytes).
Chunk = tuple[int, bytes]


def _blosc_chunks(images: np.ndarray) -> list[Chunk]:
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


def _raw_chunks(images: np.ndarray) -> list[Chunk]:
    """Unfiltered chunks: each slice's bytes as they are."""
    return [(0, np.ascontiguousarray(chunk).tobytes()) for chunk in images]


def _filtered_chunks(images: np.ndarray, compression: str) -> list[Chunk]:
    """Any filter: run it on an in-memory HDF5 file and read the chunks back, with
    their filter masks (LZF, an optional filter, skips chunks it cannot shrink)."""
    name = f"medssl-chunks-{os.getpid()}-{id(images)}"
    with h5py.File(name, "w", driver="core", backing_store=False) as scratch:
        dataset = scratch.create_dataset(
            IMAGES, data=images, chunks=(1, *images.shape[1:]), **COMPRESSION[compression]
        )
        return [dataset.id.read_direct_chunk((i, 0, 0, 0)) for i in range(len(images))]


CHUNK_ENCODERS: Registry[Callable[[np.ndarray], list[Chunk]]] = Registry(
    "compression",
    {
        "blosc": _blosc_chunks,
        # LZF has no direct encoder here: the in-memory file runs HDF5's filter.
        "lzf": lambda images: _filtered_chunks(images, "lzf"),
        "none": _raw_chunks,
    },
)
"""How a worker turns slices into stored chunk bytes, per ``compression`` setting."""


def encode_chunks(images: np.ndarray, compression: str) -> list[Chunk]:
    """Each slice of (n, C, H, W) as (filter mask, bytes) of its one-slice HDF5 chunk.

    Encoding directly with the codec spares the in-memory HDF5 file, whose
    fresh buffers for every task cost more in page faults than the
    compression itself.
    """
    return CHUNK_ENCODERS[compression](images)
