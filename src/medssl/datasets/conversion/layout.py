"""The names of the HDF5 layout (:mod:`medssl.datasets.hdf5` is the contract).

Spelled out here because importing :mod:`medssl.datasets.hdf5` loads torch
(seconds and ~900 MB per worker process) for a few names; a test checks that
the two agree.
"""

from __future__ import annotations

IMAGES = "images"
META = "meta"
STRING_META = ("patient_id", "study_uid", "series_uid", "sop_uid", "source_file")
#: (N, 2) per row: native shape, shape after resampling, top-left offset on the
#: stored grid (negative: cropped), stored pixels per native pixel
#: (:class:`medssl.datasets.resizing.Geometry`).
GEOMETRY_META = ("original_shape", "resized_shape", "pad_offset", "scale")
META_COLUMNS = (*STRING_META, "slice_index", "z", "spacing", *GEOMETRY_META)
REJECT_COLUMNS = ("file", "series_uid", "reason")
