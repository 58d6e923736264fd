"""DICOM -> HDF5: exact HU, geometric order, every file accounted for, policies, sizes.

The bad-input corpus of the series-level policies (gaps, tilt, reject
fraction, pseudonyms) is here too; what each DICOM encoding or damage turns
into is tested with the reader (``tests/dicom/test_reading.py``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from medssl.core.registry import UnknownNameError
from medssl.datasets import conversion as convert
from medssl.datasets import hdf5 as data
from medssl.datasets import synthetic as synth
from medssl.datasets.conversion import driver, pixels
from medssl.datasets.resizing import Geometry, to_stored_grid
from medssl.dicom.reading import slice_position
from medssl.pipeline.config import load_schema
from tests.corpus import copy_cohort, make_cohort, run_conversion

COHORT = {"patients": 3, "slices": 8, "matrix": 32, "seed": 1}
HU_NATIVE = {"intensity": {"policy": "hu"}, "image_size": None}


def _hu(path: Path) -> np.ndarray:
    """Reference HU straight from pydicom."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _series_files(root: Path) -> dict[str, list[Path]]:
    """Non-localizer files per series."""
    series: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "LOCALIZER" not in list(ds.ImageType):
            series.setdefault(ds.SeriesInstanceUID, []).append(path)
    return series


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small synthetic cohort with one series' InstanceNumbers scrambled."""
    root = tmp_path_factory.mktemp("convert")
    dicom = root / "dicom"
    synth.synthesize(dicom, root / "labels.csv", COHORT)
    series = _series_files(dicom)
    scrambled_uid = sorted(series)[0]
    paths = series[scrambled_uid]
    numbers = np.random.default_rng(5).permutation(len(paths)) + 1
    for path, number in zip(paths, numbers, strict=True):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = int(number)
        ds.save_as(path)
    return {"root": root, "dicom": dicom, "series": series, "scrambled": scrambled_uid}


@pytest.fixture(scope="module")
def native(clean: dict) -> dict:
    """The clean cohort converted to raw HU at native size."""
    out, rejects = clean["root"] / "native.h5", clean["root"] / "native.rejects.csv"
    summary = convert.convert(clean["dicom"], out, rejects, HU_NATIVE)
    return {"h5": out, "rejects": pd.read_csv(rejects), "summary": summary}


def test_hu_round_trips_exactly(clean: dict, native: dict) -> None:
    meta = data.read_meta(native["h5"])
    with h5py.File(native["h5"]) as handle:
        images = handle["images"]
        assert images.dtype == np.int16
        assert images.shape == (3 * 2 * 8, 1, 32, 32)
        assert images.chunks == (1, 1, 32, 32)
        assert images.attrs["compression"] == "blosc"
        assert images.id.get_create_plist().get_filter(0)[0] == 32001  # Blosc
        assert images.attrs["policy"] == "hu"
        assert images.attrs["scale"] == pytest.approx(1e-3)
        assert images.attrs["offset"] == 0
        stored = images[...]
    for i, rel in enumerate(meta["source_file"]):
        np.testing.assert_array_equal(stored[i, 0], _hu(clean["dicom"] / rel))
    model_input = data.load_images(native["h5"], [0])
    np.testing.assert_allclose(model_input.numpy(), stored[:1] / 1000.0, rtol=1e-6)


def test_slices_sorted_by_position_not_instance_number(clean: dict, native: dict) -> None:
    meta = data.read_meta(native["h5"])
    keys = list(
        zip(meta["patient_id"], meta["study_uid"], meta["series_uid"], meta["z"], strict=True)
    )
    assert keys == sorted(keys), "ordered by (patient, study, series, position)"
    for _, group in meta.groupby("series_uid"):
        assert (np.diff(group["z"]) > 0).all()
        assert list(group["slice_index"]) == list(range(len(group)))
    for row in meta.itertuples():
        ds = pydicom.dcmread(clean["dicom"] / row.source_file, stop_before_pixels=True)
        assert row.sop_uid == ds.SOPInstanceUID
        assert row.z == pytest.approx(
            slice_position(ds.ImageOrientationPatient, ds.ImagePositionPatient)
        )
    scrambled = meta[meta["series_uid"] == clean["scrambled"]]
    numbers = [
        int(pydicom.dcmread(clean["dicom"] / f, stop_before_pixels=True).InstanceNumber)
        for f in scrambled["source_file"]
    ]
    assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)


def test_scout_rejected_and_files_accounted(clean: dict, native: dict) -> None:
    rejects, summary = native["rejects"], native["summary"]
    assert list(rejects.columns) == ["file", "series_uid", "reason"]
    assert len(rejects) == 3
    assert rejects["reason"].str.contains("LOCALIZER").all()
    n_files = len(list(clean["dicom"].rglob("*.dcm")))
    assert summary["files_seen"] == n_files == summary["converted"] + summary["rejected"]
    with h5py.File(native["h5"]) as handle:
        attrs = dict(handle.attrs)
    assert attrs["n_files_seen"] == n_files
    assert (attrs["n_converted"], attrs["n_rejected"], attrs["n_series"]) == (48, 3, 6)
    provenance = json.loads(attrs["provenance"])
    assert provenance["stage"] == "convert"
    assert provenance["settings"]["intensity"] == {"policy": "hu"}


def test_meta_spacing_and_labels_join(clean: dict, native: dict) -> None:
    meta = data.read_meta(native["h5"])
    labels = pd.read_csv(clean["root"] / "labels.csv")
    assert set(meta["sop_uid"]) == set(labels["sop_uid"])
    with h5py.File(native["h5"]) as handle:
        spacing = handle["meta/spacing"][...]
    assert spacing.dtype == np.float32 and spacing.shape == (48, 3)
    ds = pydicom.dcmread(clean["dicom"] / meta["source_file"][0], stop_before_pixels=True)
    expected = [float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]), float(ds.SliceThickness)]
    np.testing.assert_allclose(spacing[0], expected, rtol=1e-4)
    assert data.image_shape(native["h5"]) == (1, 32, 32)


def test_window_policy(clean: dict, native: dict) -> None:
    out = clean["root"] / "window.h5"
    windows = [{"center": -300, "width": 1600}, {"center": 40, "width": 400}]
    settings = {"intensity": {"policy": "window", "windows": windows}, "image_size": None}
    convert.convert(clean["dicom"], out, clean["root"] / "window.csv", settings)
    with h5py.File(out) as handle, h5py.File(native["h5"]) as ref:
        images = handle["images"]
        assert images.dtype == np.uint8 and images.shape[1] == 2
        assert images.attrs["scale"] == pytest.approx(1 / 255)
        assert images.attrs["offset"] == 0
        assert json.loads(images.attrs["channels"]) == [
            {"window": [-300.0, 1600.0]},
            {"window": [40.0, 400.0]},
        ]
        stored, hu = images[...], ref["images"][:, 0].astype(np.float64)
    for channel, window in enumerate(windows):
        low = window["center"] - window["width"] / 2
        expected = np.rint((np.clip(hu, low, low + window["width"]) - low) / window["width"] * 255)
        np.testing.assert_array_equal(stored[:, channel], expected.astype(np.uint8))
    x = data.load_images(out)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_minmax_policy(clean: dict) -> None:
    out = clean["root"] / "minmax.h5"
    settings = {"intensity": {"policy": "minmax"}, "image_size": None}
    convert.convert(clean["dicom"], out, clean["root"] / "minmax.csv", settings)
    with h5py.File(out) as handle:
        images = handle["images"]
        assert images.dtype == np.uint8 and images.shape[1] == 1
        assert images.attrs["policy"] == "minmax"
        assert images.attrs["scale"] == pytest.approx(1 / 255)
        stored = images[...]
    assert (stored.reshape(len(stored), -1).min(axis=1) == 0).all()
    assert (stored.reshape(len(stored), -1).max(axis=1) == 255).all()


def test_image_size_resizes_and_updates_spacing(clean: dict, native: dict) -> None:
    out = clean["root"] / "small.h5"
    settings = {"intensity": {"policy": "hu", "dtype": "float16"}, "image_size": 16}
    convert.convert(clean["dicom"], out, clean["root"] / "small.csv", settings)
    with h5py.File(out) as handle, h5py.File(native["h5"]) as ref:
        assert handle["images"].shape == (48, 1, 16, 16)
        assert handle["images"].dtype == np.float16
        small, full = handle["images"][:, 0].astype(np.float64), ref["images"][:, 0]
        np.testing.assert_allclose(handle["meta/spacing"][:, :2], ref["meta/spacing"][:, :2] * 2)
        np.testing.assert_allclose(handle["meta/spacing"][:, 2], ref["meta/spacing"][:, 2])
    # Halving by area averaging: each pixel is the mean of a 2x2 block (float16 rounding).
    blocks = full.reshape(48, 16, 2, 16, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(small, blocks, atol=1.0)


def test_resample_matrix() -> None:
    for n_in, n_out in [(32, 16), (96, 64), (10, 25), (7, 7)]:
        weights = convert.resample_matrix(n_in, n_out)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0)
        assert (weights >= 0).all()
    rng = np.random.default_rng(0)
    for shape, size in [((2, 32, 48), 16), ((1, 10, 12), 25), ((3, 9, 9), 9)]:
        stack = rng.normal(size=shape)
        dense = [
            convert.resample_matrix(shape[1], size) @ s @ convert.resample_matrix(shape[2], size).T
            for s in stack
        ]
        np.testing.assert_allclose(convert.resize(stack, size), np.stack(dense), atol=1e-12)
    ramp = np.arange(96, dtype=float)
    # Area averaging preserves the mean of a linear ramp exactly.
    assert (convert.resample_matrix(96, 64) @ ramp).mean() == pytest.approx(ramp.mean())


@pytest.fixture(scope="module")
def messy(clean: dict) -> dict:
    """The clean cohort plus broken, foreign and duplicate files."""
    root = clean["root"] / "messy"
    shutil.copytree(clean["dicom"], root)
    series = {
        uid: [root / p.relative_to(clean["dicom"]) for p in paths]
        for uid, paths in clean["series"].items()
    }
    uids = sorted(series)
    broken: dict[str, str] = {}

    truncated = series[uids[1]][0]
    truncated.write_bytes(truncated.read_bytes()[:-700])
    broken[truncated.relative_to(root).as_posix()] = "truncated pixel data"

    cut_header = series[uids[1]][1]
    cut_header.write_bytes(cut_header.read_bytes()[:600])
    broken[cut_header.relative_to(root).as_posix()] = "truncated or no pixel data"

    no_position = series[uids[2]][0]
    ds = pydicom.dcmread(no_position)
    del ds.ImagePositionPatient
    ds.save_as(no_position)
    broken[no_position.relative_to(root).as_posix()] = "missing required tag ImagePositionPatient"

    text = root / "notes" / "README.txt"
    text.parent.mkdir()
    text.write_text("not an image\n")
    broken["notes/README.txt"] = "not DICOM"

    duplicate = series[uids[3]][2]
    ds = pydicom.dcmread(duplicate)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["duplicate"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    copy = duplicate.parent / ("zz" + duplicate.name)  # sorts after the original
    ds.save_as(copy)
    broken[copy.relative_to(root).as_posix()] = "duplicate position"

    mr = series[uids[3]][3]
    ds = pydicom.dcmread(mr)
    ds.Modality = "MR"
    ds.save_as(mr)
    broken[mr.relative_to(root).as_posix()] = "modality MR"

    tilted = series[uids[4]][0]
    ds = pydicom.dcmread(tilted)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8660254, -0.5]
    ds.save_as(tilted)
    broken[tilted.relative_to(root).as_posix()] = "orientation"

    report = root / "report.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["report"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    sr.SOPClassUID, sr.SOPInstanceUID = BasicTextSRStorage, meta.MediaStorageSOPInstanceUID
    sr.Modality, sr.PatientID = "SR", "SYN1-0000"
    sr.save_as(report, enforce_file_format=True)
    broken["report.dcm"] = "non-image SOP class Basic Text SR Storage"

    (root / "DICOMDIR").write_bytes(b"")  # skipped, not counted
    out, rejects = clean["root"] / "messy.h5", clean["root"] / "messy.csv"
    summary = convert.convert(root, out, rejects, HU_NATIVE)
    return {
        "root": root,
        "h5": out,
        "rejects": pd.read_csv(rejects),
        "summary": summary,
        "broken": broken,
    }


def test_broken_files_rejected_with_reasons(messy: dict) -> None:
    rejects = messy["rejects"].set_index("file")
    for rel, reason in messy["broken"].items():
        assert rel in rejects.index, rel
        assert reason in rejects.loc[rel, "reason"], (rel, rejects.loc[rel, "reason"])
    assert rejects["reason"].str.contains("LOCALIZER").sum() == 3
    assert len(rejects) == len(messy["broken"]) + 3
    summary = messy["summary"]
    assert summary["files_seen"] == summary["converted"] + summary["rejected"]
    assert summary["files_seen"] == sum(1 for p in messy["root"].rglob("*") if p.is_file()) - 1
    assert summary["converted"] == 48 - 5  # five slices broken in place; the copy was added
    meta = data.read_meta(messy["h5"])
    assert not set(meta["source_file"]) & set(messy["broken"])
    for rel in meta["source_file"][:5]:
        with h5py.File(messy["h5"]) as handle:
            row = int(np.flatnonzero(meta["source_file"] == rel)[0])
            np.testing.assert_array_equal(handle["images"][row, 0], _hu(messy["root"] / rel))


def test_rle_compressed_series_decodes(clean: dict, native: dict) -> None:
    folder = clean["root"] / "rle"
    uid = sorted(clean["series"])[1]
    for path in clean["series"][uid]:
        ds = pydicom.dcmread(path)
        try:
            ds.compress(RLELossless, generate_instance_uid=False)
        except (RuntimeError, NotImplementedError) as err:  # pragma: no cover - encoder missing
            pytest.skip(f"RLE encoder unavailable: {err}")
        target = folder / path.relative_to(clean["dicom"])
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
    assert pydicom.dcmread(target).file_meta.TransferSyntaxUID == RLELossless
    rejects = folder.parent / "rle.csv"
    convert.convert(folder, folder.parent / "rle.h5", rejects, HU_NATIVE)
    assert list(pd.read_csv(rejects).columns) == ["file", "series_uid", "reason"]
    assert pd.read_csv(rejects).empty
    meta, ref = data.read_meta(folder.parent / "rle.h5"), data.read_meta(native["h5"])
    rows = ref.index[ref["series_uid"] == uid]
    assert list(meta["sop_uid"]) == list(ref.loc[rows, "sop_uid"])
    np.testing.assert_array_equal(
        data.load_images(folder.parent / "rle.h5").numpy(),
        data.load_images(native["h5"], list(rows)).numpy(),
    )


@pytest.mark.parametrize(
    ("threads", "module", "setting"),
    [(2, driver, "SLICES_PER_TASK"), (1, pixels, "SLICES_PER_BLOCK")],
)
def test_threads_and_blocks_give_identical_output(
    clean: dict,
    native: dict,
    threads: int,
    module: object,
    setting: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 8-slice series in pieces of 3: tasks for the workers, or blocks in one process.
    monkeypatch.setattr(module, setting, 3)
    out = clean["root"] / f"threads{threads}.h5"
    rejects = clean["root"] / f"threads{threads}.csv"
    summary = convert.convert(clean["dicom"], out, rejects, HU_NATIVE, threads)
    assert summary["converted"] == native["summary"]["converted"]
    assert summary["series"] == native["summary"]["series"]
    pd.testing.assert_frame_equal(data.read_meta(out), data.read_meta(native["h5"]))
    with h5py.File(out) as a, h5py.File(native["h5"]) as b:
        np.testing.assert_array_equal(a["images"][...], b["images"][...])
        np.testing.assert_array_equal(a["meta/spacing"][...], b["meta/spacing"][...])
        np.testing.assert_array_equal(a["meta/slice_index"][...], b["meta/slice_index"][...])


def test_nothing_usable_fails_naming_the_folder(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("hello")
    with pytest.raises(convert.NoUsableImagesError, match=str(junk)):
        convert.convert(junk, tmp_path / "j.h5", tmp_path / "j.csv", {})
    assert not (tmp_path / "j.h5").exists()
    assert len(pd.read_csv(tmp_path / "j.csv")) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="policy"):
        convert.resolve_settings({"intensity": {"policy": "zscore"}})
    with pytest.raises(ValueError, match="image_size"):
        convert.resolve_settings({"image_size": 0})
    assert convert.resolve_settings(None)["image_size"] == 64


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"intensity": {"policy": "widnow"}}, "unknown intensity policy 'widnow'; did you mean"),
        ({"intensity": {"policy": "hu", "dtype": "int8"}}, "known: float16, int16"),
        ({"compression": "zstd"}, "unknown compression 'zstd'; known: blosc, lzf, none"),
        ({"gap_policy": "splt"}, "unknown gap policy 'splt'; did you mean 'split'?"),
        ({"tilt_policy": "reports"}, "unknown tilt policy 'reports'; did you mean 'report'?"),
    ],
)
def test_unknown_names_list_the_known_ones(settings: dict, message: str) -> None:
    with pytest.raises(UnknownNameError, match=re.escape(message)):
        convert.resolve_settings(settings)


def test_defaults_are_the_config_schemas() -> None:
    """Key by key: the code's defaults and the schema's ``data.convert`` defaults."""
    schema = load_schema()["properties"]["data"]["properties"]["convert"]["properties"]
    assert set(schema) == set(convert.DEFAULTS)
    for key, spec in schema.items():
        if key == "intensity":
            continue
        assert spec["default"] == convert.DEFAULTS[key], key
    intensity = schema["intensity"]["properties"]
    assert set(intensity) == set(convert.INTENSITY_DEFAULTS)
    for key, spec in intensity.items():
        assert spec["default"] == convert.INTENSITY_DEFAULTS[key], key
    for key, value in convert.DEFAULTS["intensity"].items():
        assert value == convert.INTENSITY_DEFAULTS[key], key
    assert set(intensity["policy"]["enum"]) == set(convert.INTENSITY_POLICIES)
    assert set(schema["compression"]["enum"]) == set(convert.COMPRESSION)


def test_every_compression_has_a_chunk_encoder() -> None:
    assert set(convert.CHUNK_ENCODERS) == set(convert.COMPRESSION)


def test_meta_columns_follow_the_data_contract() -> None:
    expected = {*data.STRING_META, *data.NUMERIC_META, "spacing", *data.GEOMETRY_META}
    assert set(convert.META_COLUMNS) == expected
    assert convert.STRING_META == data.STRING_META
    assert (convert.IMAGES, convert.META) == (data.IMAGES, data.META)


@pytest.mark.parametrize("compression", sorted(convert.COMPRESSION))
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float16])
def test_worker_chunks_decode_through_the_hdf5_filter(compression: str, dtype: type) -> None:
    """Chunks encoded by workers are what the dataset's own filter decodes."""
    stack = np.random.default_rng(0).normal(0, 300, (3, 2, 24, 20)).astype(dtype)
    with h5py.File("chunks", "w", driver="core", backing_store=False) as handle:
        images = handle.create_dataset(
            "images",
            shape=stack.shape,
            dtype=dtype,
            chunks=(1, 2, 24, 20),
            **convert.COMPRESSION[compression],
        )
        for row, (mask, chunk) in enumerate(convert.encode_chunks(stack, compression)):
            images.id.write_direct_chunk((row, 0, 0, 0), chunk, mask)
        np.testing.assert_array_equal(images[...], stack)


# --------------------------------------------------------------------------- series policies


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two patients, one 8-slice series each, to damage per test."""
    return make_cohort(tmp_path_factory)


@pytest.mark.parametrize(
    ("policy", "converted", "n_series", "rejected_gap"), [("split", 15, 3, 0), ("reject", 8, 1, 7)]
)
def test_gap_policy(
    corpus: dict, policy: str, converted: int, n_series: int, rejected_gap: int
) -> None:
    folder, series = copy_cohort(corpus, f"gap_{policy}")
    uid = sorted(series)[0]
    series[uid][4].unlink()  # a missing slice: one step of twice the median
    summary, rejects, out = run_conversion(folder, {"gap_policy": policy})
    assert summary["converted"] == converted
    assert summary["series"] == n_series
    assert rejects["reason"].str.contains("series has gaps").sum() == rejected_gap
    if policy == "split":
        meta = data.read_meta(out)
        parts = meta[meta["series_uid"].str.startswith(uid)]
        assert sorted(set(parts["series_uid"])) == [f"{uid}#1", f"{uid}#2"]
        assert parts.groupby("series_uid").size().tolist() == [4, 3]
        assert "1 gap(s)" in summary["findings"][uid][0]


def test_gantry_tilt_reported(corpus: dict) -> None:
    folder, series = copy_cohort(corpus, "tilt")
    uid = sorted(series)[0]
    for path in series[uid]:  # stacked 15 degrees off the (axial) normal
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + z * np.tan(np.radians(15)), z]
        ds.save_as(path)
    summary, rejects, out = run_conversion(folder)
    assert summary["converted"] == 16 and len(rejects) == 2
    assert summary["findings"][uid][0].startswith("gantry tilt 15.0 deg")
    with h5py.File(out) as handle:
        assert "gantry tilt" in json.loads(handle.attrs["series_findings"])[uid][0]
    summary, rejects, _ = run_conversion(folder, {"tilt_policy": "reject"})
    assert summary["converted"] == 8 and summary["series"] == 1
    assert rejects["reason"].str.startswith("gantry tilt 15.0 deg (tilt_policy reject)").sum() == 8


def test_max_reject_fraction_fails_without_output(corpus: dict) -> None:
    folder = corpus["root"] / "fraction"
    shutil.copytree(corpus["clean"], folder)  # 2 localizers of 18 files: 11 %
    with pytest.raises(convert.TooManyRejectsError, match="max_reject_fraction"):
        run_conversion(folder, {"max_reject_fraction": 0.1})
    assert not (corpus["root"] / "fraction.h5").exists()
    assert (corpus["root"] / "fraction.rejects.csv").exists()
    summary, _, _ = run_conversion(folder, {"max_reject_fraction": 0.2})
    assert summary["rejected"] == 2


def test_pseudonymised_patient_ids(corpus: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSSL_TEST_KEY", "secret")
    folder = corpus["root"] / "pseudo"
    shutil.copytree(corpus["clean"], folder)
    _, _, out = run_conversion(folder, {"pseudonym_key_env": "MEDSSL_TEST_KEY"})
    meta = data.read_meta(out)
    originals = {
        pydicom.dcmread(folder / f, stop_before_pixels=True).PatientID for f in meta["source_file"]
    }
    ids = set(meta["patient_id"])
    assert len(ids) == len(originals) == 2 and not ids & originals
    assert ids == {convert.pseudonymize(p, b"secret") for p in originals}
    with h5py.File(out) as handle:
        assert "secret" not in handle.attrs["provenance"]
    monkeypatch.delenv("MEDSSL_TEST_KEY")
    with pytest.raises(ValueError, match="MEDSSL_TEST_KEY"):
        convert.resolve_settings({"pseudonym_key_env": "MEDSSL_TEST_KEY"})


# --- mixed matrix sizes and the stored grid ---------------------------------------

MIXED = ((32, 11), (24, 12), (20, 13))  # (matrix, seed) of three one-series cohorts


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A DICOM archive of four series with different matrix sizes, one non-square
    (a 32 x 32 series cropped to 28 x 20 in its pixel data)."""
    root = tmp_path_factory.mktemp("mixed")
    for matrix, seed in MIXED:
        cohort = {"patients": 1, "series_per_patient": 1, "slices": 5, "matrix": matrix}
        cohort["seed"] = seed
        synth.synthesize(root / "dicom" / f"m{matrix}", root / f"labels{matrix}.csv", cohort)
    cohort = {"patients": 1, "series_per_patient": 1, "slices": 5, "matrix": 32, "seed": 14}
    synth.synthesize(root / "dicom" / "cropped", root / "labels_cropped.csv", cohort)
    for paths in _series_files(root / "dicom" / "cropped").values():
        for path in paths:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array[2:30, 6:26].copy()
            ds.Rows, ds.Columns = pixels.shape
            ds.PixelData = pixels.tobytes()
            ds.save_as(path)
    return {"root": root, "dicom": root / "dicom", "series": _series_files(root / "dicom")}


def test_mixed_matrix_sizes_keep_every_series_with_exact_hu(mixed: dict) -> None:
    out, rejects = mixed["root"] / "pad.h5", mixed["root"] / "pad.csv"
    summary = convert.convert(mixed["dicom"], out, rejects, HU_NATIVE)
    assert summary["series"] == 4
    assert set(pd.read_csv(rejects)["reason"].str.split(" ").str[0]) <= {"localizer"}
    with h5py.File(out) as handle:
        images = handle["images"]
        assert images.shape[2:] == (32, 32)  # the largest height and width
        meta = handle["meta"]
        files = list(meta["source_file"].asstr()[...])
        shapes = {tuple(s) for s in meta["original_shape"][...]}
        assert shapes == {(32, 32), (24, 24), (20, 20), (28, 20)}
        for paths in mixed["series"].values():
            for path in paths:
                row = files.index(path.relative_to(mixed["dicom"]).as_posix())
                hu = _hu(path)
                top, left = meta["pad_offset"][row]
                h, w = meta["original_shape"][row]
                assert (h, w) == hu.shape
                stored = images[row, 0]
                np.testing.assert_array_equal(stored[top : top + h, left : left + w], hu)
                outside = np.ones(stored.shape, bool)
                outside[top : top + h, left : left + w] = False
                assert (stored[outside] == -1024).all()  # padded with air


def test_geometry_reject_keeps_only_the_majority_shape(mixed: dict) -> None:
    out, rejects = mixed["root"] / "reject.h5", mixed["root"] / "reject.csv"
    summary = convert.convert(mixed["dicom"], out, rejects, {**HU_NATIVE, "geometry": "reject"})
    assert summary["series"] == 1
    reasons = pd.read_csv(rejects)["reason"]
    differ = reasons[reasons.str.contains("differs from dataset shape")]
    assert len(differ) == 15  # three series of five slices
    assert "(image_size is null, so sizes must match)" in differ.iloc[0]


def test_crop_and_fit_geometries(mixed: dict) -> None:
    out = mixed["root"] / "crop.h5"
    convert.convert(mixed["dicom"], out, mixed["root"] / "c.csv", {**HU_NATIVE, "geometry": "crop"})
    with h5py.File(out) as handle:
        assert handle["images"].shape[2:] == (20, 20)
        assert (handle["meta/pad_offset"][...] <= 0).all()
    out = mixed["root"] / "fit.h5"
    settings = {"intensity": {"policy": "hu", "dtype": "float16"}, "image_size": 16}
    convert.convert(mixed["dicom"], out, mixed["root"] / "f.csv", settings)
    with h5py.File(out) as handle:
        meta = handle["meta"]
        rows = [k for k, s in enumerate(meta["original_shape"][...]) if tuple(s) == (28, 20)]
        assert tuple(meta["resized_shape"][rows[0]]) == (16, 11)  # long side 16, ratio kept
        assert tuple(meta["pad_offset"][rows[0]]) == (0, 2)
        np.testing.assert_allclose(meta["scale"][rows[0]], [16 / 28, 11 / 20], rtol=1e-6)


def test_target_spacing_resamples_first(mixed: dict) -> None:
    out = mixed["root"] / "spaced.h5"
    settings = {**HU_NATIVE, "target_spacing": [20.0, 20.0]}
    convert.convert(mixed["dicom"], out, mixed["root"] / "s.csv", settings)
    with h5py.File(out) as handle:
        spacing = handle["meta/spacing"][...]
        resized = handle["meta/resized_shape"][...]
        original = handle["meta/original_shape"][...]
    # every stored pixel is about 20 mm (to the rounding of the resampled shape)
    np.testing.assert_allclose(spacing[:, :2], 20.0, rtol=0.25)
    assert len({tuple(s) for s in resized}) < len({tuple(s) for s in original})


def test_to_stored_grid_moves_a_mask_like_its_image() -> None:
    """A native mask through a row's geometry lands where the image's pixels land."""
    image = np.zeros((28, 20), np.float64)
    image[10:18, 4:12] = 100.0
    mask = (image > 0).astype(np.uint8)
    for geometry in (
        Geometry((28, 20), (28, 20), (2, 6), (32, 32)),  # padded
        Geometry((28, 20), (16, 11), (0, 2), (16, 16)),  # fit pad
        Geometry((28, 20), (22, 16), (-3, 0), (16, 16)),  # fit crop
    ):
        stored_image = to_stored_grid(image, geometry)
        for resampling in ("area", "nearest"):
            stored_mask = to_stored_grid(mask, geometry, resampling)
            assert stored_mask.shape == geometry.stored
            # the mask covers the image's bright pixels and little else
            bright = stored_image >= 50
            assert (stored_mask[bright] == 1).mean() > 0.9
            assert (stored_mask[stored_image < 10] == 0).all()
    with pytest.raises(ValueError, match="native shape"):
        to_stored_grid(mask[:20], Geometry((28, 20), (28, 20), (0, 0), (28, 20)))


def test_reject_fraction_warning_names_count_and_reasons(
    corpus: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """Localizers are rejected images; a README is a rejected file, not an image."""
    folder, _ = copy_cohort(corpus, "with_readme")
    (folder / "README.txt").write_text("scanner export notes")
    with caplog.at_level("WARNING"):
        summary, rejects, _ = run_conversion(folder, {"warn_reject_fraction": 0.01})
    assert summary["files_seen"] == 19 and summary["not_images"] == 1
    assert rejects.loc["README.txt", "reason"].startswith("not DICOM")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "2 of 18 images rejected" in warnings[0] and "localizer" in warnings[0]
    assert "not DICOM" not in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        run_conversion(corpus["clean"], {"warn_reject_fraction": 0.2})
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_read_geometry_gives_each_rows_transform(mixed: dict) -> None:
    out = mixed["root"] / "geometry.h5"
    convert.convert(mixed["dicom"], out, mixed["root"] / "g.csv", HU_NATIVE)
    geometries = data.read_geometry(out)
    meta = data.read_meta(out)
    assert geometries is not None and len(geometries) == len(meta)
    with h5py.File(out) as handle:
        for row in (0, len(meta) - 1):
            path = mixed["dicom"] / meta.at[row, "source_file"]
            stored = to_stored_grid(_hu(path), geometries[row], fill=-1024)
            np.testing.assert_array_equal(handle["images"][row, 0], stored)


@pytest.mark.parametrize(
    ("settings", "source", "message"),
    [
        ({"geometry": "padd"}, "dicom", "geometry must be one of pad, crop, resize, reject"),
        ({"fit": "squash"}, "dicom", "fit must be one of pad, crop"),
        ({"rgb": "colour"}, "images", "rgb must be one of grey, keep"),
        ({"target_spacing": [0.7]}, "dicom", "target_spacing must be null or [row, column]"),
        ({"target_spacing": [0.7, 0.7]}, "images", "target_spacing needs pixel spacing"),
        ({"warn_reject_fraction": 2}, "dicom", "warn_reject_fraction must be null or in [0, 1]"),
        ({"intensity": {"policy": "scale"}}, "nifti", "does not apply to source nifti"),
    ],
)
def test_geometry_settings_are_checked(settings: dict, source: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        convert.resolve_settings(settings, source=source)


def test_image_sources_store_with_scale() -> None:
    resolved = convert.resolve_settings({"intensity": {"policy": "window"}}, source="npz")
    assert resolved["intensity"] == {"policy": "scale"}
