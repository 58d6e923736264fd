"""SIIM-ACR Pneumothorax Segmentation (2019): chest radiographs as DICOM with RLE masks.

Published on Kaggle (https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation;
the original challenge data came from the SIIM Cloud Healthcare API): download
``dicom-images-train`` and ``train-rle.csv``. Expected tree::

    root/train-rle.csv                               ImageId, EncodedPixels
    root/dicom-images-train/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm

The released header has a space before ``EncodedPixels``; it is stripped.
Masks are SIIM's relative RLE of the 1024x1024 image (:mod:`.rle`); several
rows of one image are a union; ``-1`` is an image without pneumothorax.

Label ``pneumothorax``: 1 when any row of the image has a run. The patient is
the DICOM PatientID (one image per patient in this release). No official
split (the challenge's stage-2 test labels are not part of this layout).
Structure: ``pneumothorax``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medssl.datasets.presets.base import Manifest, Preset, PresetError, find_one, read_csv
from medssl.datasets.presets.rle import EMPTY, decode_rle
from medssl.dicom.reading import read_dataset

RLE_FILE = "train-rle.csv"
DICOM_FOLDER = "dicom-images-train"
IMAGE_SIZE = (1024, 1024)
LABEL = "pneumothorax"


def read_rle_table(path: Path) -> pd.DataFrame:
    """``ImageId`` and ``EncodedPixels`` of a train-rle.csv (header padding stripped)."""
    table = read_csv(path, "siim", ["ImageId", "EncodedPixels"], dtype=str)
    table["EncodedPixels"] = table["EncodedPixels"].fillna(EMPTY).str.strip()
    return table


def rle_masks(
    path: Path, sizes: Mapping[str, tuple[int, int]] | None = None
) -> dict[str, np.ndarray]:
    """Masks keyed by ImageId: the union of the image's rows (``-1`` rows add nothing).

    ``sizes``: the native (height, width) per ImageId where known (the
    converted dataset's ``original_shape``); otherwise the release's 1024x1024.
    """
    sizes = sizes or {}
    masks: dict[str, np.ndarray] = {}
    for image_id, encoded in read_rle_table(path).itertuples(index=False):
        size = sizes.get(image_id, IMAGE_SIZE)
        mask = decode_rle(encoded, *size, origin=f"{path}, ImageId {image_id}")
        masks[image_id] = masks[image_id] | mask if image_id in masks else mask
    return masks


class Siim(Preset):
    name = "siim"
    kind = "dicom"
    structures = ("pneumothorax",)

    def _scan(self, root: Path, options: dict[str, Any]) -> Manifest:
        rle = find_one(root, self.name, [RLE_FILE], "the masks")
        images = find_one(root, self.name, [DICOM_FOLDER], "the DICOM tree")
        table = read_rle_table(rle)
        positive = table.groupby("ImageId")["EncodedPixels"].agg(lambda v: int((v != EMPTY).any()))
        files = {p.stem: p for p in sorted(images.rglob("*.dcm"))}
        rows, rejects = [], []
        for sop, path in files.items():
            file = path.relative_to(images).as_posix()
            if sop not in positive.index:
                rejects.append((file, f"image with no row in {RLE_FILE}"))
                continue
            with open(path, "rb") as handle:
                ds = read_dataset(handle, stop_before_pixels=True)
            patient = str(getattr(ds, "PatientID", "") or sop)
            rows.append([sop, patient, "", int(positive[sop])])
        rejects += [
            (sop, f"listed in {RLE_FILE} but no {sop}.dcm under {DICOM_FOLDER}/")
            for sop in sorted(set(positive.index) - set(files))
        ]
        if not rows:
            raise PresetError(f"{self.name}: {images}: no .dcm file matches an ImageId of {rle}")
        frame = pd.DataFrame(rows, columns=["sop_uid", "patient_id", "official_split", LABEL])
        # The release's radiographs are CR (and DX on some exports): whatever the
        # config's modalities, they are what this dataset is.
        modalities = {"modalities": ["CR", "DX"]}
        return Manifest("dicom", images, frame, rejects, [LABEL], convert_settings=modalities)

    def _masks(
        self, root: Path, structure: str, sizes: dict[str, tuple[int, int]]
    ) -> dict[str, np.ndarray]:
        return rle_masks(find_one(root, self.name, [RLE_FILE], "the masks"), sizes)
