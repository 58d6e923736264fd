"""Image sources beside DICOM, all written in the layout of :mod:`medssl.datasets.hdf5`.

- :mod:`~.images`: PNG, JPEG, TIFF, GIF and BMP files listed by a manifest
  (:mod:`~.manifest`), decoded by Pillow;
- :mod:`~.npz`: MedMNIST-style archives with their official split;
- :mod:`~.nifti`: NIfTI volumes in HU, cut into axial slices.

Each writes the same ``/images`` and ``/meta``, rejects CSV and root
attributes as the DICOM path (:func:`medssl.datasets.conversion.convert`);
the images and npz sources also write a labels table keyed by ``sop_uid``.
The command line is ``python -m medssl.convert --source ...``.
"""

from __future__ import annotations

from medssl.datasets.sources.images import convert_images
from medssl.datasets.sources.manifest import ManifestError, labels_table, load_manifest
from medssl.datasets.sources.nifti import convert_nifti
from medssl.datasets.sources.npz import ArchiveError, convert_npz

__all__ = [
    "ArchiveError",
    "ManifestError",
    "convert_images",
    "convert_npz",
    "convert_nifti",
    "labels_table",
    "load_manifest",
]
