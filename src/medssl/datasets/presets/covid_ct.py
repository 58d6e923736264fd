"""COVID-CT (UCSD-AI4H): CT slices from COVID-19 papers and non-COVID CT images.

Published at https://github.com/UCSD-AI4H/COVID-CT: unzip
``Images-processed/CT_COVID.zip`` and ``CT_NonCOVID.zip`` and take the
``Data-split`` folder. Expected tree (the image folders here or in
``Images-processed/``; the lists anywhere below ``root``)::

    CT_COVID/2020.01.24.919183-p27-132.png ...     349 images (PNG/JPEG)
    CT_NonCOVID/0.jpg, 1%0.jpg ...                 397 images
    Data-split/COVID/trainCT_COVID.txt, valCT_COVID.txt, testCT_COVID.txt
    Data-split/NonCOVID/trainCT_NonCOVID.txt, valCT_NonCOVID.txt, testCT_NonCOVID.txt

Label ``covid``: 1 for ``CT_COVID``, 0 for ``CT_NonCOVID``. Official split:
the lists. Patient: the release names no patient per file, but images cut
from one figure share the name before ``%`` (``1%0.jpg``, ``1%1.jpg``), so
the patient is the file name up to ``%`` (or its stem), prefixed by the
class folder. This only joins figure panels; two figures of one patient stay
apart, which the released split lists did not guard against either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from medssl.datasets.presets.base import Manifest, Preset, PresetError, find_release, read_list

CLASSES = (("CT_COVID", 1), ("CT_NonCOVID", 0))
SPLITS = (("train", "train"), ("val", "val"), ("test", "test"))
SUFFIXES = {".png", ".jpg", ".jpeg"}
LABEL = "covid"


def patient_of(folder: str, name: str) -> str:
    """The patient rule of the module docstring: ``CT_NonCOVID/1%0.jpg`` -> ``CT_NonCOVID/1``."""
    return f"{folder}/{Path(name).stem.split('%', 1)[0]}"


class CovidCt(Preset):
    name = "covid_ct"
    kind = "images"

    def _scan(self, root: Path, options: dict[str, Any]) -> Manifest:
        images = find_release(root, self.name, ["CT_COVID", "CT_NonCOVID"], ["Images-processed"])
        rows, rejects = [], []
        for folder, label in CLASSES:
            if not (images / folder).is_dir():
                raise PresetError(f"{self.name}: {images}: no {folder}/")
            split_of = self._lists(root, folder)
            present = sorted(
                p.name for p in (images / folder).iterdir() if p.suffix.lower() in SUFFIXES
            )
            for name in present:
                file = f"{folder}/{name}"
                if name not in split_of:
                    rejects.append((file, f"in no {folder} split list"))
                else:
                    rows.append(
                        [
                            file,
                            patient_of(folder, name),
                            patient_of(folder, name),
                            file,
                            split_of[name],
                            label,
                        ]
                    )
            rejects += [
                (f"{folder}/{n}", "listed in a split list but no image file")
                for n in sorted(set(split_of) - set(present))
            ]
        columns = ["file", "patient_id", "study_id", "image_id", "official_split", LABEL]
        return Manifest("images", images, pd.DataFrame(rows, columns=columns), rejects, [LABEL])

    def _lists(self, root: Path, folder: str) -> dict[str, str]:
        """File name -> split from the three lists of one class."""
        split_of: dict[str, str] = {}
        for prefix, split in SPLITS:
            name = f"{prefix}{folder}.txt"
            found = sorted(root.rglob(name))
            if not found:
                raise PresetError(f"{self.name}: {root}: no {name} (Data-split/ list)")
            for entry in read_list(found[0], self.name):
                if entry in split_of and split_of[entry] != split:
                    raise PresetError(f"{self.name}: {entry} is in two {folder} lists")
                split_of[entry] = split
        return split_of
