"""A small synthetic DICOM cohort and a conversion runner, for the bad-input corpus.

Not a test module: the conversion, DICOM-reading and ``convert`` stage tests
import it. Each test damages, re-encodes or re-arranges a copy of the cohort
and checks that every file ends as data or as a reject with the right reason.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from medssl.datasets.conversion import convert
from medssl.datasets.synthetic import synthesize

COHORT = {"patients": 2, "series_per_patient": 1, "slices": 8, "matrix": 32, "seed": 3}
HU_NATIVE = {"intensity": {"policy": "hu"}, "image_size": None}


def series_by_position(root: Path) -> dict[str, list[Path]]:
    """Non-localizer files per series, sorted by position (z ascending)."""
    series: dict[str, list[tuple[float, Path]]] = {}
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "LOCALIZER" not in list(ds.ImageType):
            series.setdefault(ds.SeriesInstanceUID, []).append(
                (float(ds.ImagePositionPatient[2]), path)
            )
    return {uid: [p for _, p in sorted(items)] for uid, items in series.items()}


def reference_hu(path: Path) -> np.ndarray:
    """Reference HU straight from pydicom."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def make_cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The clean cohort (2 patients, one 8-slice series each, plus localizers)."""
    root = tmp_path_factory.mktemp("corpus")
    synthesize(root / "clean", root / "labels.csv", COHORT)
    return {"root": root, "clean": root / "clean", "series": series_by_position(root / "clean")}


def copy_cohort(cohort: dict, name: str) -> tuple[Path, dict[str, list[Path]]]:
    """A copy of the clean cohort to damage, and its series' files in the copy."""
    folder = cohort["root"] / name
    shutil.copytree(cohort["clean"], folder)
    series = {
        uid: [folder / p.relative_to(cohort["clean"]) for p in paths]
        for uid, paths in cohort["series"].items()
    }
    return folder, series


def run_conversion(folder: Path, settings: dict | None = None) -> tuple[dict, pd.DataFrame, Path]:
    """Convert ``folder`` beside itself; check the file accounting; return the summary,
    the rejects (indexed by file) and the HDF5 path."""
    out = folder.parent / f"{folder.name}.h5"
    rejects = folder.parent / f"{folder.name}.rejects.csv"
    summary = convert(folder, out, rejects, {**HU_NATIVE, **(settings or {})})
    assert summary["files_seen"] == summary["converted"] + summary["rejected"]
    assert summary["files_seen"] == sum(1 for p in folder.rglob("*") if p.is_file())
    return summary, pd.read_csv(rejects).set_index("file"), out
