"""DICOM folder -> one HDF5 dataset in the layout of :mod:`medssl.datasets.hdf5`.

Every file found is either converted or listed in the rejects CSV with a reason
(``files seen = converted + rejected`` is checked), because a benchmark that
silently loses slices cannot be audited. The work happens in three passes:

1. headers only (:mod:`~.driver`, :mod:`medssl.dicom.reading`): readability,
   SOP class, required tags, modality, localizers (plain uncompressed files by
   :mod:`medssl.dicom.rawheader`, which also notes where their pixels are;
   everything else by pydicom with ``stop_before_pixels``);
2. per series (:mod:`~.planning`): majority orientation and shape, sort along
   the slice normal (never by InstanceNumber or file name), drop duplicate
   positions, gaps and gantry tilt by their policies;
3. pixels in blocks of :data:`~.pixels.SLICES_PER_BLOCK` slices (:mod:`~.pixels`):
   decode, HU, resample, intensity policy (:mod:`~.intensity`), and place on the
   dataset's grid (:class:`medssl.datasets.resizing.Grid`: slices of different
   matrix sizes are padded, cropped or resized by the ``geometry`` setting, and
   each row's geometry is stored in ``/meta``). With ``threads`` > 1, worker processes take parts of
   series (:data:`~.driver.SLICES_PER_TASK` slices) and return them compressed
   into HDF5 chunks (:mod:`~.chunks`); the single writer (:mod:`~.writing`)
   places chunks in output order as results arrive, so memory holds a few
   parts, never the dataset.

Settings and their defaults are in :mod:`~.settings`; the command line is
``python -m medssl.convert``. Image files, npz archives and NIfTI volumes go
through :mod:`medssl.datasets.sources`, which ends in the same writer
(:func:`~.driver.write_dataset`). The names below are the public interface.
"""

from __future__ import annotations

from medssl.datasets.conversion.chunks import CHUNK_ENCODERS, encode_chunks
from medssl.datasets.conversion.driver import (
    NoUsableImagesError,
    TooManyRejectsError,
    convert,
)
from medssl.datasets.conversion.intensity import (
    INTENSITY_DEFAULTS,
    INTENSITY_POLICIES,
    Intensity,
)
from medssl.datasets.conversion.layout import (
    IMAGES,
    META,
    META_COLUMNS,
    REJECT_COLUMNS,
    STRING_META,
)
from medssl.datasets.conversion.pixels import SeriesResult, iter_blocks, process_series
from medssl.datasets.conversion.planning import SeriesPlan, plan_series, pseudonymize
from medssl.datasets.conversion.settings import (
    COMPRESSION,
    DEFAULTS,
    STANDALONE_DEFAULTS,
    resolve_settings,
)
from medssl.datasets.conversion.writing import reason_counts
from medssl.datasets.resizing import Geometry, Grid, resample_matrix, resize, to_stored_grid

__all__ = [
    "CHUNK_ENCODERS",
    "COMPRESSION",
    "DEFAULTS",
    "Geometry",
    "Grid",
    "IMAGES",
    "INTENSITY_DEFAULTS",
    "INTENSITY_POLICIES",
    "META",
    "META_COLUMNS",
    "REJECT_COLUMNS",
    "STANDALONE_DEFAULTS",
    "STRING_META",
    "Intensity",
    "NoUsableImagesError",
    "SeriesPlan",
    "SeriesResult",
    "TooManyRejectsError",
    "convert",
    "encode_chunks",
    "iter_blocks",
    "plan_series",
    "process_series",
    "pseudonymize",
    "reason_counts",
    "resample_matrix",
    "resize",
    "resolve_settings",
    "to_stored_grid",
]
