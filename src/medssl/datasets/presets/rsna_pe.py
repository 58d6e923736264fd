"""RSNA STR Pulmonary Embolism Detection (2020): CT pulmonary angiograms as DICOM.

Published on Kaggle (https://www.kaggle.com/c/rsna-str-pulmonary-embolism-detection):
download ``train/`` and ``train.csv``. Expected tree::

    root/train.csv
    root/train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

``train.csv`` has one row per image, keyed by ``SOPInstanceUID``; its label
columns (all 0/1) are the image-level ``pe_present_on_image`` and the
study-level ones repeated on every image of the study (``negative_exam_for_pe``,
``rv_lv_ratio_gte_1``, ``central_pe``, ``indeterminate``, ...). The release
has no patient identifier beyond the study, so the patient is the
``StudyInstanceUID``. No official split (the test labels are not public).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from medssl.datasets.presets.base import Manifest, Preset, find_one, read_csv

KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
LABELS = (
    "pe_present_on_image",
    "negative_exam_for_pe",
    "qa_motion",
    "qa_contrast",
    "flow_artifact",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
    "leftsided_pe",
    "chronic_pe",
    "true_filling_defect_not_pe",
    "rightsided_pe",
    "acute_and_chronic_pe",
    "central_pe",
    "indeterminate",
)


class RsnaPe(Preset):
    name = "rsna_pe"
    kind = "dicom"

    def _scan(self, root: Path, options: dict[str, Any]) -> Manifest:
        csv = find_one(root, self.name, ["train.csv"], "the labels")
        images = find_one(root, self.name, ["train"], "the DICOM tree")
        table = read_csv(csv, self.name, [*KEYS, *LABELS], dtype={k: str for k in KEYS})
        files = {p.relative_to(images).as_posix() for p in images.rglob("*.dcm")}
        expected = (
            table["StudyInstanceUID"]
            + "/"
            + table["SeriesInstanceUID"]
            + "/"
            + table["SOPInstanceUID"]
            + ".dcm"
        )
        rejects = [
            (f, f"listed in {csv.name} but no image file") for f in expected[~expected.isin(files)]
        ]
        keep = expected.isin(files).to_numpy().copy()
        for column in LABELS:
            bad = keep & ~table[column].isin([0, 1]).to_numpy()
            rejects += [
                (f, f"{csv.name}: column {column!r} has {v!r}, not 0 or 1")
                for f, v in zip(expected[bad], table.loc[bad, column], strict=True)
            ]
            keep &= ~bad
        rejects += [(f, f"image with no row in {csv.name}") for f in sorted(files - set(expected))]
        kept = table.loc[keep]
        frame = pd.DataFrame(
            {
                "sop_uid": kept["SOPInstanceUID"],
                "patient_id": kept["StudyInstanceUID"],
                "official_split": "",
                **{c: kept[c].astype(int) for c in LABELS},
            }
        ).reset_index(drop=True)
        return Manifest(
            "dicom",
            images,
            frame,
            rejects,
            list(LABELS),
            convert_settings={"patient_key": "study_uid", "modalities": ["CT"]},
        )
