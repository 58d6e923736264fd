"""The synthetic cohort: valid CT DICOM, plausible HU, labels that match, deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian
from scipy import ndimage

from medssl.core.registry import UnknownNameError
from medssl.datasets import synthetic as synth
from medssl.pipeline.config import load_schema

SMALL = {"patients": 6, "slices": 8, "matrix": 32, "seed": 0}


def _read_all(root: Path) -> dict[str, pydicom.FileDataset]:
    """Every file below ``root`` keyed by its path relative to ``root``."""
    return {p.relative_to(root).as_posix(): pydicom.dcmread(p) for p in root.rglob("*.dcm")}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("synth")
    out, labels = root / "dicom", root / "labels.csv"
    summary = synth.synthesize(out, labels, SMALL)
    return {"root": root, "dir": out, "labels": pd.read_csv(labels), "summary": summary}


@pytest.fixture(scope="module")
def files(cohort: dict) -> dict[str, pydicom.FileDataset]:
    return _read_all(cohort["dir"])


def _is_scout(ds: pydicom.Dataset) -> bool:
    return "LOCALIZER" in list(ds.ImageType)


def test_files_are_valid_ct(files: dict[str, pydicom.FileDataset]) -> None:
    assert len(files) == 6 * (2 * 8 + 1)
    for ds in files.values():
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT"
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert UID(ds[keyword].value).is_valid, keyword
        assert float(ds.RescaleSlope) == 1.0
        assert float(ds.RescaleIntercept) == -1024.0
        assert ds.RescaleType == "HU"
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.SamplesPerPixel, ds.PixelRepresentation) == (16, 1, 0)
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        if not _is_scout(ds):
            assert (ds.Rows, ds.Columns) == (32, 32)
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert float(ds.SpacingBetweenSlices) > 0
    sop_uids = [ds.SOPInstanceUID for ds in files.values()]
    assert len(set(sop_uids)) == len(sop_uids)


def test_layout_is_nested_and_shuffled(cohort: dict, files: dict[str, pydicom.FileDataset]) -> None:
    for rel, ds in files.items():
        patient, _study, name = rel.split("/")
        assert patient == ds.PatientID
        stem = name.removesuffix(".dcm")
        assert len(stem) == 24 and int(stem, 16) >= 0, "hash-like names, not slice numbers"
    # File names carry no slice order: sorted by name, a series is not sorted by position.
    series: dict[str, list[tuple[str, float]]] = {}
    for rel, ds in files.items():
        if not _is_scout(ds):
            series.setdefault(ds.SeriesInstanceUID, []).append(
                (rel, float(ds.ImagePositionPatient[2]))
            )
    unsorted = 0
    for members in series.values():
        z = [pos for _, pos in sorted(members)]
        unsorted += z != sorted(z) and z != sorted(z, reverse=True)
    assert unsorted >= len(series) - 1
    assert not [p for p in cohort["root"].iterdir() if p.name.startswith(".")], "temp dir left"


def test_labels_match_files(cohort: dict, files: dict[str, pydicom.FileDataset]) -> None:
    labels = cohort["labels"]
    assert list(labels.columns) == list(synth.LABEL_COLUMNS)
    images = {ds.SOPInstanceUID: ds for ds in files.values() if not _is_scout(ds)}
    assert set(labels["sop_uid"]) == set(images)
    assert len(labels) == len(images) == 6 * 2 * 8
    for row in labels.itertuples():
        ds = images[row.sop_uid]
        assert (row.patient_id, row.study_uid, row.series_uid) == (
            ds.PatientID,
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
        )
    scouts = [ds for ds in files.values() if _is_scout(ds)]
    assert len(scouts) == 6
    assert not set(ds.SOPInstanceUID for ds in scouts) & set(labels["sop_uid"])


def test_both_nodule_classes_and_all_regions(cohort: dict, files) -> None:
    labels = cohort["labels"]
    assert set(labels["nodule"]) == {0, 1}
    assert set(labels["region"]) == set(synth.REGIONS)
    # Nodules live in the lungs, so only thorax slices can be positive.
    positive_regions = set(labels.loc[labels["nodule"] == 1, "region"])
    assert positive_regions <= {"upper_thorax", "lower_thorax"}
    # Both reconstructions of a position share its labels.
    z = {
        ds.SOPInstanceUID: round(float(ds.ImagePositionPatient[2]), 3)
        for ds in files.values()
        if not _is_scout(ds)
    }
    labels = labels.assign(z=labels["sop_uid"].map(z))
    per_position = labels.groupby(["patient_id", "z"])[["nodule", "region"]].nunique()
    assert (per_position == 1).all().all()
    assert cohort["summary"]["images"] == len(labels)


def test_regions_follow_anatomy_top_to_bottom(cohort: dict, files) -> None:
    order = {r: i for i, r in enumerate(synth.REGIONS)}
    z = {ds.SOPInstanceUID: float(ds.ImagePositionPatient[2]) for ds in files.values()}
    labels = cohort["labels"].assign(z=lambda f: f["sop_uid"].map(z))
    for _, series in labels.groupby("series_uid"):
        codes = series.sort_values("z", ascending=False)["region"].map(order).to_numpy()
        assert (np.diff(codes) >= 0).all()


def test_hu_of_known_structures(tmp_path: Path) -> None:
    synth.synthesize(
        tmp_path / "d", tmp_path / "l.csv", {"patients": 1, "slices": 8, "matrix": 64, "seed": 3}
    )
    labels = pd.read_csv(tmp_path / "l.csv").set_index("sop_uid")
    for ds in _read_all(tmp_path / "d").values():
        if _is_scout(ds):
            continue
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        region = labels.loc[ds.SOPInstanceUID, "region"]
        corners = np.concatenate([hu[:4, :4].ravel(), hu[-4:, -4:].ravel()])
        assert -1100 < corners.mean() < -900, "air outside the body"
        assert hu.max() > 300, "the spine is in every slice"
        if region in ("upper_abdomen", "lower_abdomen"):
            assert -50 < np.median(hu[24:40, 24:40]) < 150, "soft tissue in the abdomen"
        # Air-like pixels well inside the body outline: lungs (or a little bowel gas).
        body = ndimage.binary_erosion(ndimage.binary_fill_holes(hu > -500), iterations=3)
        inner_air = int((body & (hu < -500)).sum())
        if region == "upper_thorax":
            assert inner_air > 150, "lungs in the upper thorax"
            assert np.percentile(hu[body & (hu < -500)], 10) < -800, "lung parenchyma HU"
        if region == "lower_abdomen":
            assert inner_air < 40, "no lungs in the lower abdomen"


def test_deterministic_for_a_seed(cohort: dict, files, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synth.synthesize(again, tmp_path / "again.csv", SMALL)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again.csv"), cohort["labels"])
    first = {p.relative_to(cohort["dir"]) for p in cohort["dir"].rglob("*") if p.is_file()}
    second = {p.relative_to(again) for p in again.rglob("*") if p.is_file()}
    assert first == second
    for rel in first:
        assert (cohort["dir"] / rel).read_bytes() == (again / rel).read_bytes(), rel

    other = tmp_path / "other"
    synth.synthesize(other, tmp_path / "other.csv", {**SMALL, "seed": 1})
    other_labels = pd.read_csv(tmp_path / "other.csv")
    assert not set(other_labels["sop_uid"]) & set(cohort["labels"]["sop_uid"])
    pixels = {ds.PixelData for ds in files.values()}
    assert not pixels & {ds.PixelData for ds in _read_all(other).values()}


def test_rerun_replaces_folder_atomically(tmp_path: Path) -> None:
    out = tmp_path / "dicom"
    settings = {"patients": 1, "slices": 4, "matrix": 16, "scout": False}
    synth.synthesize(out, tmp_path / "l.csv", settings)
    (out / "stale.txt").write_text("from an older run")
    summary = synth.synthesize(out, tmp_path / "l.csv", settings)
    assert not (out / "stale.txt").exists()
    assert summary["files"] == summary["images"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dicom", "l.csv"]


def test_settings_are_checked() -> None:
    with pytest.raises(UnknownNameError, match="unknown synthetic setting 'patient'; did you mean"):
        synth.resolve_settings({"patient": 3})
    with pytest.raises(ValueError, match="matrix"):
        synth.resolve_settings({"matrix": 0})
    assert synth.resolve_settings(None) == synth.DEFAULTS


def test_defaults_are_the_config_schemas() -> None:
    """Key by key: the code's defaults and the schema's ``synthetic`` defaults."""
    datasets = load_schema()["properties"]["data"]["properties"]["datasets"]
    schema = datasets["additionalProperties"]["properties"]["synthetic"]["properties"]
    assert {key: spec["default"] for key, spec in schema.items()} == synth.DEFAULTS


def test_uids_and_file_names_are_fixed_by_seed_and_parts() -> None:
    """UIDs are the cohort's identity: labels, masks and splits of earlier runs refer to them."""
    study = synth._uid(0, "SYN0-0000", "study")
    assert study == "1.2.826.0.1.3680043.8.498.40031271253483691087087186860907567958"
    image = synth._uid(7, "SYN7-0003", "image", 1, 5)
    assert image == "1.2.826.0.1.3680043.8.498.19117449613884689822710157917976291064"
    assert synth._file_name(image) == "e14ac2cab243cb5592c8044b.dcm"
