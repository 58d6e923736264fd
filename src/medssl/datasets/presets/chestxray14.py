"""ChestX-ray14 (NIH Clinical Center): 112,120 frontal chest radiographs, 14 findings.

Published at https://nihcc.app.box.com/v/ChestXray-NIHCC: download the twelve
``images_001.tar.gz`` ... ``images_012.tar.gz``, ``Data_Entry_2017.csv`` (or the
corrected ``Data_Entry_2017_v2020.csv``), ``train_val_list.txt`` and
``test_list.txt``. Expected tree (either image layout)::

    root/Data_Entry_2017.csv | Data_Entry_2017_v2020.csv
    root/train_val_list.txt, root/test_list.txt
    root/images_001/images/00000001_000.png ...   (as unpacked)
    root/images/00000001_000.png ...              (or one flat folder)

Labels: one 0/1 column per finding, named as in the release (``Atelectasis``
... ``Pleural_Thickening``, ``Hernia``), from the pipe-separated ``Finding
Labels`` (``No Finding``: all 0). Official split: ``train_val_list.txt`` ->
train (the release has no validation list; the split stage carves it by
patient), ``test_list.txt`` -> test. Patient: ``Patient ID``; study: the
image's follow-up (``<patient>_<follow-up>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from medssl.datasets.presets.base import (
    Manifest,
    Preset,
    PresetError,
    find_one,
    read_csv,
    read_list,
)

FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
ENTRY_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")


class ChestXray14(Preset):
    name = "chestxray14"
    kind = "images"

    def _scan(self, root: Path, options: dict[str, Any]) -> Manifest:
        # The 2020 file corrects labels of the 2017 one, so it wins when both are there.
        entry = next((root / n for n in reversed(ENTRY_FILES) if (root / n).is_file()), None)
        if entry is None:
            find_one(root, self.name, ENTRY_FILES, "the label table")
        columns = ("Image Index", "Finding Labels", "Patient ID", "Follow-up #")
        table = read_csv(entry, self.name, columns, dtype=str)
        images = _image_files(root, self.name)
        split_of = {name: "train" for name in read_list(root / "train_val_list.txt", self.name)}
        split_of.update(dict.fromkeys(read_list(root / "test_list.txt", self.name), "test"))
        rows, rejects = [], []
        for name, findings, patient_id, follow_up in table[list(columns)].itertuples(index=False):
            labels = str(findings).split("|")
            unknown = [x for x in labels if x not in FINDINGS and x != NO_FINDING]
            if name not in images:
                rejects.append((name, f"listed in {entry.name} but no image file"))
            elif unknown:
                rejects.append((name, f"{entry.name}: column 'Finding Labels' has {unknown}"))
            elif name not in split_of:
                rejects.append((name, "in neither train_val_list.txt nor test_list.txt"))
            else:
                patient = f"{int(patient_id):08d}"
                row = {
                    "file": images[name],
                    "patient_id": patient,
                    "study_id": f"{patient}_{int(follow_up):03d}",
                    "image_id": name,
                    "official_split": split_of[name],
                }
                row.update({f: int(f in labels) for f in FINDINGS})
                rows.append(row)
        listed = set(table["Image Index"])
        rejects += [
            (images[n], f"image with no row in {entry.name}") for n in sorted(set(images) - listed)
        ]
        frame = pd.DataFrame(rows, columns=[*_columns()])
        return Manifest("images", root, frame, rejects, list(FINDINGS))


def _columns() -> list[str]:
    return ["file", "patient_id", "study_id", "image_id", "official_split", *FINDINGS]


def _image_files(root: Path, preset: str) -> dict[str, str]:
    """Image name -> path relative to root, from ``images_*/images/`` or a flat ``images/``."""
    paths = sorted(root.glob("images_*/images/*.png")) + sorted(root.glob("images/*.png"))
    if not paths:
        raise PresetError(f"{preset}: {root}: no images_*/images/*.png or images/*.png")
    return {p.name: p.relative_to(root).as_posix() for p in paths}
