"""CheXpert (Stanford ML Group): 224,316 chest radiographs of 65,240 patients, 14 observations.

Published at https://stanfordmlgroup.github.io/competitions/chexpert/ (after
registration): ``CheXpert-v1.0-small.zip`` (downsampled) or ``CheXpert-v1.0``
(full resolution). Expected tree (``root`` may be the release folder or the
folder holding it)::

    CheXpert-v1.0-small/train.csv, valid.csv
    CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg ...
    CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg ...

Each ``Path`` starts with the release folder's name
(``CheXpert-v1.0-small/train/...``); ``file`` is that path without it. The 14
observation columns hold ``1.0`` (positive), ``0.0`` (negative), ``-1.0``
(uncertain) or blank (not mentioned). Blank becomes 0; uncertain follows
``preset_options.uncertainty``:

* ``u_ones`` (default): 1; ``u_zeros``: 0;
* ``ignore``: :data:`IGNORE` (-1): the image is kept but that label must be
  left out of the loss and of the scores for it;
* ``lsr_ones``: a soft label drawn from U(0.55, 0.85) (label smoothing
  towards one, as the transfer benchmark uses), seeded by
  ``preset_options.seed`` and drawn in row order, so a scan is repeatable.

``frontal_only: true`` keeps ``Frontal/Lateral == Frontal`` images. The patient
is the ``patientNNNNN`` folder of the path; the study ``patientNNNNN/studyK``.
Official split: ``train.csv`` -> train, ``valid.csv`` -> val. The test set
is not public, so there is no official test split.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medssl.datasets.presets.base import Manifest, Preset, PresetError, find_release, read_csv

OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
IGNORE = -1
UNCERTAIN = -1.0
ALLOWED = (1.0, 0.0, -1.0)
POLICIES = ("u_ones", "u_zeros", "ignore", "lsr_ones")
LSR_RANGE = (0.55, 0.85)
SPLIT_FILES = (("train.csv", "train"), ("valid.csv", "val"))


class CheXpert(Preset):
    name = "chexpert"
    kind = "images"
    options = {"uncertainty": "u_ones", "frontal_only": False, "seed": 0}

    def _scan(self, root: Path, options: dict[str, Any]) -> Manifest:
        policy = options["uncertainty"]
        if policy not in POLICIES:
            raise PresetError(f"{self.name}: uncertainty {policy!r} is not one of {POLICIES}")
        release = find_release(
            root, self.name, ["train.csv"], ["CheXpert-v1.0-small", "CheXpert-v1.0"]
        )
        rows, rejects = [], []
        for csv_name, split in SPLIT_FILES:
            table = read_csv(
                release / csv_name, self.name, ["Path", "Frontal/Lateral", *OBSERVATIONS]
            )
            for record in table.to_dict("records"):
                row, reason = _row(record, release, csv_name, split)
                if reason:
                    rejects.append((row["file"], reason))
                elif options["frontal_only"] and record["Frontal/Lateral"] != "Frontal":
                    continue
                else:
                    rows.append(row)
        frame = pd.DataFrame(
            rows,
            columns=["file", "patient_id", "study_id", "image_id", "official_split", *OBSERVATIONS],
        )
        frame = _apply_policy(frame, policy, int(options["seed"]))
        listed = set(frame["file"]) | {file for file, _ in rejects}
        for folder in ("train", "valid"):
            for path in sorted((release / folder).rglob("*.jpg")):
                file = path.relative_to(release).as_posix()
                if file not in listed and not options["frontal_only"]:
                    rejects.append((file, "image with no row in train.csv or valid.csv"))
        return Manifest("images", release, frame, rejects, list(OBSERVATIONS))


def _row(record: dict, release: Path, csv_name: str, split: str) -> tuple[dict, str]:
    """One manifest row from a CSV record, and why it is rejected ('' when it is not)."""
    parts = Path(str(record["Path"])).parts
    # The path repeats the release folder's name, whatever the user renamed it to.
    file = (
        Path(*parts[1:]).as_posix()
        if parts and parts[0] not in ("train", "valid")
        else str(record["Path"])
    )
    patient = next((p for p in parts if p.startswith("patient")), "")
    study = next((p for p in parts if p.startswith("study")), "")
    row = {
        "file": file,
        "patient_id": patient,
        "study_id": f"{patient}/{study}",
        "image_id": file,
        "official_split": split,
    }
    if not patient or not study:
        return row, f"{csv_name}: Path {record['Path']!r} has no patient/study folder"
    if not (release / file).is_file():
        return row, f"listed in {csv_name} but no image file"
    for column in OBSERVATIONS:
        value = record[column]
        if isinstance(value, float) and math.isnan(value):
            row[column] = 0.0  # blank: not mentioned in the report
        elif value in ALLOWED:
            row[column] = float(value)
        else:
            return row, f"{csv_name}: column {column!r} has {value!r}, not 1, 0, -1 or blank"
    return row, ""


def _apply_policy(frame: pd.DataFrame, policy: str, seed: int) -> pd.DataFrame:
    """Uncertain labels (-1) resolved by the policy (see the module docstring)."""
    labels = frame[list(OBSERVATIONS)].to_numpy(dtype=np.float64, copy=True)
    uncertain = labels == UNCERTAIN
    if policy == "u_ones":
        labels[uncertain] = 1.0
    elif policy == "u_zeros":
        labels[uncertain] = 0.0
    elif policy == "ignore":
        labels[uncertain] = IGNORE
    else:  # lsr_ones: one draw per uncertain entry, row-major order
        rng = np.random.default_rng(seed)
        labels[uncertain] = rng.uniform(*LSR_RANGE, size=int(uncertain.sum()))
    frame = frame.copy()
    frame[list(OBSERVATIONS)] = labels if policy == "lsr_ones" else labels.astype(np.int64)
    return frame
