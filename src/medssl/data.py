"""The converted-dataset contract: one HDF5 file per dataset.

Layout (written by :mod:`medssl.convert`, read by every training stage)::

    /images               (N, C, H, W) uint8 | int16 | float16, one chunk per slice
        attrs: policy     intensity policy name ("hu", "window", "minmax")
               scale, offset   model input = stored * scale + offset (float32)
               channels   JSON list describing each channel
    /meta/patient_id      (N,) UTF-8 strings
    /meta/study_uid       (N,) UTF-8 strings
    /meta/series_uid      (N,) UTF-8 strings
    /meta/sop_uid         (N,) UTF-8 strings
    /meta/source_file     (N,) UTF-8 strings
    /meta/slice_index     (N,) int32, position of the slice in its sorted series
    /meta/z               (N,) float64, position along the slice normal in mm
    /meta/spacing         (N, 3) float32, (row, column, slice) spacing of the stored pixels in mm
    root attrs: provenance (JSON), n_files_seen, n_converted, n_rejected, n_series

Row ``i`` of every dataset describes the same slice; the row number is the
sample index used by splits and fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  registers the Blosc filter that medssl.convert writes with
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

IMAGES = "images"
META = "meta"
STRING_META = ("patient_id", "study_uid", "series_uid", "sop_uid", "source_file")
NUMERIC_META = ("slice_index", "z")


def open_h5(path: str | Path) -> h5py.File:
    """Open a converted dataset read-only, naming the file if it is not one."""
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise OSError(f"{path}: cannot open as HDF5 ({err})") from err
    if IMAGES not in handle or META not in handle:
        handle.close()
        raise ValueError(f"{path}: not a medssl dataset (needs /{IMAGES} and /{META})")
    return handle


def read_meta(path: str | Path) -> pd.DataFrame:
    """Per-slice metadata as a data frame whose index is the sample index."""
    with open_h5(path) as handle:
        meta = handle[META]
        columns = {name: meta[name].asstr()[...] for name in STRING_META if name in meta}
        for name in NUMERIC_META:
            if name in meta:
                columns[name] = meta[name][...]
    return pd.DataFrame(columns)


def image_shape(path: str | Path) -> tuple[int, int, int]:
    """(channels, height, width) of the stored slices."""
    with open_h5(path) as handle:
        _, channels, height, width = handle[IMAGES].shape
    return int(channels), int(height), int(width)


def load_images(path: str | Path, indices: Sequence[int] | None = None) -> torch.Tensor:
    """Read slices as float32 model input (N, C, H, W), in the order of ``indices``.

    For data that fits in memory (the synthetic default, small fine-tuning sets);
    large pools go through :class:`SliceDataset` instead.
    """
    with open_h5(path) as handle:
        images = handle[IMAGES]
        scale = float(images.attrs["scale"])
        offset = float(images.attrs["offset"])
        if indices is None:
            stored = images[...]
        else:
            order = np.asarray(indices, dtype=np.int64)
            # h5py fancy indexing needs increasing indices: read sorted, then restore order.
            unique, inverse = np.unique(order, return_inverse=True)
            stored = images[unique][inverse] if len(unique) else images[:0]
    return torch.from_numpy(stored.astype(np.float32) * scale + offset)


class SliceDataset(Dataset):
    """Slices read lazily from HDF5, one chunk per item.

    The file is opened on first access in each worker process, because h5py
    handles cannot be shared across ``fork``.
    """

    def __init__(
        self,
        path: str | Path,
        indices: Sequence[int] | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.path = Path(path)
        with open_h5(self.path) as handle:
            images = handle[IMAGES]
            total = images.shape[0]
            self.scale = float(images.attrs["scale"])
            self.offset = float(images.attrs["offset"])
        self.indices = np.arange(total) if indices is None else np.asarray(indices, dtype=np.int64)
        if labels is not None and len(labels) != len(self.indices):
            raise ValueError(f"{len(labels)} labels for {len(self.indices)} samples")
        self.labels = None if labels is None else np.asarray(labels)
        self.transform = transform
        self._handle: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        if self._handle is None:
            self._handle = open_h5(self.path)
        stored = self._handle[IMAGES][int(self.indices[item])]
        image = torch.from_numpy(stored.astype(np.float32) * self.scale + self.offset)
        if self.transform is not None:
            image = self.transform(image)
        if self.labels is None:
            return image
        return image, torch.as_tensor(self.labels[item])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None
        return state
