"""The mask file of a segmentation task: its layout and its readers.

The file is written by :mod:`medssl.datasets.mask_sources` (layout in its docstring).

Kept apart from the mask stage so fine-tuning and splitting read masks
without importing the DICOM readers and the conversion code, whose edits
must not rerun every fine-tune.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from medssl.datasets.hdf5 import read_meta

MASKS = "masks"
ANNOTATED = "annotated"


class MaskError(ValueError):
    """Mask input that cannot be attached; the message names the file and what is wrong."""


def load_masks(path: str | Path, indices: Sequence[int]) -> np.ndarray:
    """Masks (n, H, W) uint8 of the rows ``indices``, in that order; unannotated rows are errors."""
    order = np.asarray(indices, dtype=np.int64)
    with h5py.File(path, "r") as handle:
        if MASKS not in handle or ANNOTATED not in handle:
            raise MaskError(f"{path}: not a medssl mask file (needs /{MASKS} and /{ANNOTATED})")
        annotated = handle[ANNOTATED][...]
        if len(order) and not annotated[order].all():
            missing = order[~annotated[order]][:5].tolist()
            raise MaskError(f"{path}: rows {missing} have no annotation")
        unique, inverse = np.unique(order, return_inverse=True)
        stored = handle[MASKS][unique][inverse] if len(unique) else handle[MASKS][:0]
    return stored


def open_mask_file(path: str | Path, rows: Sequence[int] | None = None) -> h5py.File:
    """The mask file opened read-only for row reads, its layout (and ``rows``' annotation) checked.

    For readers that fetch masks batch by batch
    (:class:`~medssl.datasets.hdf5.SliceReader` with ``name=MASKS``) instead of
    all at once: the checks :func:`load_masks` makes happen here, once, before
    the first batch. The chunk cache is off because a training reader visits
    each one-slice chunk once per pass.
    """
    try:
        handle = h5py.File(path, "r", rdcc_nbytes=0)
    except OSError as err:
        raise MaskError(f"{path}: cannot open as HDF5 ({err})") from err
    if MASKS not in handle or ANNOTATED not in handle:
        handle.close()
        raise MaskError(f"{path}: not a medssl mask file (needs /{MASKS} and /{ANNOTATED})")
    if rows is not None and len(rows):
        order = np.asarray(rows, dtype=np.int64)
        annotated = handle[ANNOTATED][...]
        if not annotated[order].all():
            handle.close()
            missing = order[~annotated[order]][:5].tolist()
            raise MaskError(f"{path}: rows {missing} have no annotation")
    return handle


def mask_labels(path: str | Path, data: str | Path) -> pd.DataFrame:
    """A label table for the split stage: ``sop_uid`` and ``foreground`` (0/1) per annotated slice.

    Segmentation tasks are split and stratified like binary ones, on whether
    a slice shows the structure.
    """
    meta = read_meta(data)
    with h5py.File(path, "r") as handle:
        annotated = handle[ANNOTATED][...]
        if len(annotated) != len(meta):
            raise MaskError(f"{path}: {len(annotated)} rows but {data} has {len(meta)} slices")
        foreground = np.zeros(len(meta), dtype=np.int64)
        for row in np.flatnonzero(annotated):
            foreground[row] = int(handle[MASKS][row].any())
    frame = pd.DataFrame({"sop_uid": meta["sop_uid"], "foreground": foreground})
    return frame.loc[annotated].reset_index(drop=True)
