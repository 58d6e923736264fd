"""OrganSMNIST (MedMNIST v2): 25,221 sagittal abdominal CT crops of 11 organs.

Published at https://medmnist.com/ (Zenodo record 10519652): download
``organsmnist.npz`` (28x28) or a larger MedMNIST+ one
(``organsmnist_64.npz``, ``_128``, ``_224``). Expected tree::

    root/organsmnist.npz      train_images, train_labels, val_images, ... test_labels

The archive holds its own images, labels (``label``, 0..10) and official
train/val/test split, so the manifest's table is empty and ``convert`` reads
the archive. ``preset_options.size`` picks a MedMNIST+ file (default 28).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pandas as pd

from medssl.datasets.presets.base import Manifest, Preset, PresetError, find_one

KEYS = tuple(
    f"{split}_{part}" for split in ("train", "val", "test") for part in ("images", "labels")
)


class OrganSMnist(Preset):
    name = "organsmnist"
    kind = "npz"
    options = {"size": 28}

    def _scan(self, root: Path, options: dict[str, Any]) -> Manifest:
        size = int(options["size"])
        name = "organsmnist.npz" if size == 28 else f"organsmnist_{size}.npz"
        archive = find_one(root, self.name, [name], "the MedMNIST archive")
        try:
            with zipfile.ZipFile(archive) as handle:  # an .npz is a zip of .npy files
                present = {Path(n).stem for n in handle.namelist()}
        except zipfile.BadZipFile as err:
            raise PresetError(f"{self.name}: {archive}: not an .npz archive ({err})") from None
        missing = [k for k in KEYS if k not in present]
        if missing:
            raise PresetError(f"{self.name}: {archive}: no array(s) {missing}")
        return Manifest("npz", archive, pd.DataFrame(), [], ["label"])
