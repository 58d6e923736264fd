"""The converted-dataset contract: one HDF5 file per dataset.

Layout (written by :mod:`medssl.datasets.conversion`, read by every training stage)::

    /images               (N, C, H, W) uint8 | int16 | float16, one chunk per slice
        attrs: policy     intensity policy name ("hu", "window", "minmax", "scale")
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
                          (NaN where the source has none: image files, npz)
    /meta/original_shape  (N, 2) int32, native rows, columns of the slice
    /meta/resized_shape   (N, 2) int32, rows, columns after resampling
    /meta/pad_offset      (N, 2) int32, top-left of the resampled slice on the stored
                          grid (negative: cropped); the rest is the policy's background
    /meta/scale           (N, 2) float32, stored pixels per native pixel
    root attrs: provenance (JSON), n_files_seen, n_images_seen, n_converted, n_rejected,
                n_series, source ("dicom", "images", "npz", "nifti")

The four geometry columns are what
:func:`medssl.datasets.resizing.to_stored_grid` needs to move a native-grid
array (a mask) exactly as the row's image was moved.

Row ``i`` of every dataset describes the same slice; the row number is the
sample index used by splits and fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  registers the Blosc filter that medssl.datasets.conversion writes with
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from medssl.datasets.resizing import Geometry

IMAGES = "images"
META = "meta"
STRING_META = ("patient_id", "study_uid", "series_uid", "sop_uid", "source_file")
NUMERIC_META = ("slice_index", "z")
GEOMETRY_META = ("original_shape", "resized_shape", "pad_offset", "scale")


def open_h5(path: str | Path, random_access: bool = False) -> h5py.File:
    """Open a converted dataset read-only, naming the file if it is not one.

    ``random_access`` turns HDF5's chunk cache off: a training reader visits
    each one-slice chunk once per epoch in random order, so caching only adds
    a copy (measured: the low-level read ran twice as fast without it).
    """
    try:
        handle = h5py.File(path, "r", rdcc_nbytes=0) if random_access else h5py.File(path, "r")
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


def read_geometry(path: str | Path) -> list[Geometry] | None:
    """Each row's :class:`~medssl.datasets.resizing.Geometry` (native shape, resampled
    shape, offset on the stored grid), for moving native-grid masks with
    :func:`~medssl.datasets.resizing.to_stored_grid`; ``None`` for a dataset written
    before the geometry columns existed (its slices were squashed to the grid)."""
    with open_h5(path) as handle:
        meta = handle[META]
        if not all(name in meta for name in GEOMETRY_META):
            return None
        stored = tuple(handle[IMAGES].shape[2:])
        columns = {name: meta[name][...] for name in GEOMETRY_META}
    return [Geometry.from_meta(columns, row, stored) for row in range(len(columns["scale"]))]


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


#: HDF5 filter id of Blosc (registered by hdf5plugin).
BLOSC_FILTER = 32001


def _blosc():  # noqa: ANN202 - the python-blosc module, or None
    """python-blosc with one thread (a DataLoader worker is one core), if installed."""
    try:
        import blosc
    except ImportError:  # the HDF5 filter pipeline still reads everything
        return None
    blosc.set_nthreads(1)
    return blosc


class SliceReader:
    """Reads whole slices of ``/images`` into caller-owned arrays with one HDF5 call each.

    h5py's ``dataset[i]`` builds a selection and a fresh array per call, and
    its fancy indexing (``dataset[[i, j, ...]]``) is slower still on chunked
    data; reading through the low-level dataset id with a reused file and
    memory space costs a fraction of that, which is the per-slice overhead
    a training loader pays.
    """

    def __init__(self, handle: h5py.File, name: str = IMAGES) -> None:
        # ``name``: any (N, ...) dataset with one chunk per row, e.g. a mask file's masks.
        images = handle[name]
        self.shape: tuple[int, ...] = tuple(images.shape[1:])
        self.dtype = images.dtype
        self._id = images.id
        self._memory = h5py.h5s.create_simple(self.shape)
        self._file = self._id.get_space()
        self._count = (1, *self.shape)
        self._origin = tuple(0 for _ in self.shape)
        # Blosc alone (medssl's default filter): fetch the stored chunk and
        # decompress it straight into ``out``, skipping HDF5's filter pipeline
        # and its intermediate buffer (1.35x the rate of the plain read).
        plist = self._id.get_create_plist()
        only_blosc = plist.get_nfilters() == 1 and plist.get_filter(0)[0] == BLOSC_FILTER
        self._blosc = _blosc() if only_blosc else None

    def read(self, row: int, out: np.ndarray) -> np.ndarray:
        """Slice ``row`` into ``out`` (C-contiguous, ``self.shape``, ``self.dtype``)."""
        if self._blosc is not None:
            mask, chunk = self._id.read_direct_chunk((int(row), *self._origin))
            # The size check guards ``out`` against a damaged chunk header.
            if mask == 0 and self._blosc.get_cbuffer_sizes(chunk)[0] == out.nbytes:
                self._blosc.decompress_ptr(chunk, out.ctypes.data)
                return out
        self._file.select_hyperslab((int(row), *self._origin), self._count)
        self._id.read(self._memory, self._file, out)
        return out

    def read_rows(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), C, H, W) in the order given; chunks visited in file order."""
        if out is None:
            out = np.empty((len(rows), *self.shape), self.dtype)
        for k in np.argsort(rows, kind="stable"):
            self.read(int(rows[k]), out[k])
        return out


class SliceDataset(Dataset):
    """Slices read lazily from HDF5 as float32 model input, one chunk per item.

    The file is opened on first access in each worker process, because h5py
    handles cannot be shared across ``fork``; it then stays open for the
    worker's life.
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
        self._reader: SliceReader | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _slice_reader(self) -> SliceReader:
        if self._reader is None:
            self._handle = open_h5(self.path, random_access=True)
            self._reader = SliceReader(self._handle)
        return self._reader

    def __getitem__(self, item: int):
        reader = self._slice_reader()
        stored = reader.read(int(self.indices[item]), np.empty(reader.shape, reader.dtype))
        image = stored.astype(np.float32)
        image *= self.scale
        if self.offset:
            image += self.offset
        image = torch.from_numpy(image)
        if self.transform is not None:
            image = self.transform(image)
        if self.labels is None:
            return image
        return image, torch.as_tensor(self.labels[item])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_reader"] = None
        return state


class SliceBatchDataset(SliceDataset):
    """Whole batches per item, in the stored dtype: the fast path for large pools.

    ``__getitem__`` takes a list of positions (use it with a ``BatchSampler``,
    see :func:`batch_loader`) and returns a (B, C, H, W) tensor of stored values
    (uint8/int16/float16), plus labels when given. Reading a batch in file order
    in one go, and sending 1-2 bytes per pixel instead of 4 from the workers,
    is what makes the loader keep up with a GPU; :func:`to_model_input` then
    applies ``stored * scale + offset`` on the device.
    """

    def __getitem__(self, items: Sequence[int]):  # type: ignore[override]
        positions = np.asarray(items, dtype=np.int64)
        batch = torch.from_numpy(self._slice_reader().read_rows(self.indices[positions]))
        if self.labels is None:
            return batch
        return batch, torch.as_tensor(self.labels[positions])


def to_model_input(stored: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """Stored values (any dtype, any device) to float32 model input."""
    image = stored.to(torch.float32).mul_(scale)
    return image.add_(offset) if offset else image


def batch_loader(
    dataset: SliceBatchDataset,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int | None = None,
    **loader_options,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose workers read one whole batch per call (``batch_size=None``)."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

    if shuffle:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        order = RandomSampler(dataset, generator=generator)
    else:
        order = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        sampler=BatchSampler(order, batch_size, drop_last),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        **loader_options,
    )
