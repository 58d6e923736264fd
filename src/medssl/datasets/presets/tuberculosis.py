"""Shenzhen and Montgomery County tuberculosis chest radiographs (NLM).

Published at https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html (the
"Tuberculosis Chest X-ray Image Data Sets"): ``ChinaSet_AllFiles.zip``
(Shenzhen, 662 images) and ``NLM-MontgomeryCXRSet.zip`` (Montgomery, 138
images with lung masks). Expected tree (``root`` may be the unpacked set
folder or the folder holding it)::

    ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png ...
    MontgomerySet/CXR_png/MCUCXR_0001_0.png ...
    MontgomerySet/ManualMask/leftMask/MCUCXR_0001_0.png
    MontgomerySet/ManualMask/rightMask/MCUCXR_0001_0.png

Label ``tuberculosis``: the file name's last field (``_0`` normal, ``_1``
tuberculosis). One image per patient, so the patient is the name without the
label (``CHNCXR_0001``). No official split. Montgomery's structure ``lung``
is the union of the left and the right lung mask of an image.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medssl.datasets.presets.base import (
    Manifest,
    Preset,
    PresetError,
    find_release,
    read_binary_image,
)

LABEL = "tuberculosis"


class TuberculosisSet(Preset):
    """A folder ``CXR_png`` of ``<prefix>_<number>_<label>.png`` files."""

    kind = "images"
    prefix: str
    folder: str

    def _release(self, root: Path) -> Path:
        return find_release(root, self.name, ["CXR_png"], [self.folder])

    def _scan(self, root: Path, options: dict[str, Any]) -> Manifest:
        release = self._release(root)
        pattern = re.compile(rf"^({self.prefix}_\d+)_(\d+)\.png$", re.IGNORECASE)
        rows, rejects = [], []
        for path in sorted((release / "CXR_png").iterdir()):
            if path.suffix.lower() != ".png":
                continue  # the release ships Thumbs.db and similar beside the images
            file = path.relative_to(release).as_posix()
            match = pattern.match(path.name)
            if match is None:
                rejects.append((file, f"name is not {self.prefix}_<number>_<0|1>.png"))
            elif match.group(2) not in ("0", "1"):
                rejects.append((file, f"label {match.group(2)!r} in the name is not 0 or 1"))
            else:
                patient = match.group(1)
                rows.append([file, patient, patient, path.stem, "", int(match.group(2))])
        columns = ["file", "patient_id", "study_id", "image_id", "official_split", LABEL]
        if not rows:
            raise PresetError(f"{self.name}: {release / 'CXR_png'}: no {self.prefix}_*.png images")
        return Manifest("images", release, pd.DataFrame(rows, columns=columns), rejects, [LABEL])


class Shenzhen(TuberculosisSet):
    name = "shenzhen"
    prefix = "CHNCXR"
    folder = "ChinaSet_AllFiles"


class Montgomery(TuberculosisSet):
    name = "montgomery"
    prefix = "MCUCXR"
    folder = "MontgomerySet"
    structures = ("lung",)

    def _masks(
        self, root: Path, structure: str, sizes: dict[str, tuple[int, int]]
    ) -> dict[str, np.ndarray]:
        release = self._release(root)
        sides = [release / "ManualMask" / side for side in ("leftMask", "rightMask")]
        for side in sides:
            if not side.is_dir():
                raise PresetError(f"{self.name}: {release}: no {side.relative_to(release)}/")
        left, right = ({p.name for p in s.glob("*.png")} for s in sides)
        if left != right:
            odd = sorted(left ^ right)[:3]
            raise PresetError(
                f"{self.name}: {release / 'ManualMask'}: {len(left ^ right)} image(s) have only "
                f"one lung mask (first: {odd})"
            )
        masks = {}
        for name in sorted(left):
            both = [read_binary_image(side / name) for side in sides]
            if both[0].shape != both[1].shape:
                raise PresetError(f"{self.name}: {name}: left and right masks differ in size")
            masks[f"CXR_png/{name}"] = both[0] | both[1]
        return masks
