"""DRIVE (Digital Retinal Images for Vessel Extraction): 40 colour fundus photographs.

Published at https://drive.grand-challenge.org/ (``DRIVE.zip``; the original
release from Utrecht's Image Sciences Institute also ships the test set's
manual segmentations, the Grand Challenge copy does not). Expected tree
(``root`` may be the ``DRIVE`` folder or the folder holding it)::

    training/images/21_training.tif ... 40_training.tif
    training/1st_manual/21_manual1.gif         vessel segmentation
    training/mask/21_training_mask.gif         field of view
    test/images/01_test.tif ... 20_test.tif
    test/mask/01_test_mask.gif
    test/1st_manual/01_manual1.gif             (only in some copies)

No label columns (a segmentation set). Structures: ``vessel`` (``1st_manual``)
and ``fov`` (``mask``). Official split: ``training`` -> train, ``test`` ->
test. Each image is its own patient (``image_id``: ``21_training``).
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

PARTS = (("training", "train"), ("test", "test"))
MASK_FOLDERS = {"vessel": ("1st_manual", "{n}_manual1.gif"), "fov": ("mask", "{n}_{part}_mask.gif")}


class Drive(Preset):
    name = "drive"
    kind = "images"
    structures = ("vessel", "fov")

    def _release(self, root: Path) -> Path:
        return find_release(root, self.name, ["training/images"], ["DRIVE"])

    def _scan(self, root: Path, options: dict[str, Any]) -> Manifest:
        release = self._release(root)
        rows, rejects = [], []
        for part, split in PARTS:
            for sub in ("images", "mask"):
                if not (release / part / sub).is_dir():
                    raise PresetError(f"{self.name}: {release}: no {part}/{sub}/")
            pattern = re.compile(rf"^(\d+)_{part}\.tif$")
            for path in sorted((release / part / "images").glob("*.tif")):
                file = path.relative_to(release).as_posix()
                match = pattern.match(path.name)
                if match is None:
                    rejects.append((file, f"name is not <number>_{part}.tif"))
                    continue
                missing = [
                    f"{folder}/{name.format(n=match.group(1), part=part)}"
                    for structure, (folder, name) in MASK_FOLDERS.items()
                    if (part == "training" or structure == "fov")
                    and not (
                        release / part / folder / name.format(n=match.group(1), part=part)
                    ).is_file()
                ]
                if missing:
                    rejects.append((file, f"no {part}/{missing[0]}"))
                    continue
                rows.append(
                    [file, f"drive{match.group(1)}", f"drive{match.group(1)}", path.stem, split]
                )
        columns = ["file", "patient_id", "study_id", "image_id", "official_split"]
        return Manifest("images", release, pd.DataFrame(rows, columns=columns), rejects, [])

    def _masks(
        self, root: Path, structure: str, sizes: dict[str, tuple[int, int]]
    ) -> dict[str, np.ndarray]:
        release = self._release(root)
        folder, name = MASK_FOLDERS[structure]
        masks = {}
        for part, _ in PARTS:
            for path in sorted((release / part / "images").glob("*.tif")):
                number = path.name.split("_")[0]
                mask = release / part / folder / name.format(n=number, part=part)
                if mask.is_file():
                    masks[path.relative_to(release).as_posix()] = read_binary_image(mask)
        return masks
