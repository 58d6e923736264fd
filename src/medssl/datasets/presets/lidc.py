"""LIDC-IDRI (TCIA): 1,018 thoracic CT scans, used as an unlabelled pre-training pool.

Published at https://www.cancerimagingarchive.net/collection/lidc-idri/
(download with the NBIA Data Retriever, "Classic Directory Name" layout).
Expected tree (``root`` may be the ``LIDC-IDRI`` folder or the folder holding it)::

    LIDC-IDRI/LIDC-IDRI-0001/<study>/<series>/1-001.dcm ...

No labels and no split: the ``dicom`` source reads the tree and its own DICOM
headers (patients, series), so the manifest's table is empty. The XML
nodule reads are not used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from medssl.datasets.presets.base import DICOM_COLUMNS, Manifest, Preset, PresetError


class Lidc(Preset):
    name = "lidc"
    kind = "dicom"

    def _scan(self, root: Path, options: dict[str, Any]) -> Manifest:
        for base in (root, root / "LIDC-IDRI"):
            patients = sorted(p for p in base.glob("LIDC-IDRI-*") if p.is_dir())
            if patients:
                break
        else:
            raise PresetError(
                f"{self.name}: {root}: no LIDC-IDRI-*/ patient folders (here or in LIDC-IDRI/)"
            )
        empty = [p.name for p in patients if not any(p.rglob("*.dcm"))]
        rejects = [(name, "patient folder without .dcm files") for name in empty]
        # LIDC-IDRI also holds chest radiographs (CR, DX); the pool is its CT.
        empty = pd.DataFrame(columns=list(DICOM_COLUMNS))
        return Manifest("dicom", base, empty, rejects, [], convert_settings={"modalities": ["CT"]})
