"""Reading DICOM: every damaged, foreign or re-encoded file ends as data or as a
reject with the right reason, and the HU of every encoding are the same.

Run through the whole conversion, which also checks files seen = converted +
rejected (:func:`tests.corpus.run_conversion`).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from medssl.datasets import hdf5 as data
from medssl.datasets.conversion import convert
from medssl.dicom.reading import invert_monochrome1
from tests.corpus import HU_NATIVE, copy_cohort, make_cohort, reference_hu, run_conversion


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_cohort(tmp_path_factory)


def test_damaged_files_rejected_or_recovered(cohort: dict) -> None:
    folder, series = copy_cohort(cohort, "damaged")
    first, second = (series[u] for u in sorted(series))
    expected: dict[str, str] = {}

    no_pixels = first[-1]  # an end slice: removing an inner one would make a gap
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels)
    expected[no_pixels.relative_to(folder).as_posix()] = "truncated or no pixel data"

    cut = first[2]
    cut.write_bytes(cut.read_bytes()[:-100])
    expected[cut.relative_to(folder).as_posix()] = "truncated pixel data"

    bare = first[3]  # no preamble and no "DICM": still DICOM, must convert
    reference = reference_hu(bare)
    bare.write_bytes(bare.read_bytes()[132:])
    (folder / "image.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    expected["image.jpg"] = "not DICOM"
    (folder / "empty.dcm").write_bytes(b"")
    expected["empty.dcm"] = "not DICOM"

    # Two series in one folder: the second series' files moved next to the first's.
    for path in second:
        path.rename(first[0].parent / ("other_" + path.name))

    summary, rejects, out = run_conversion(folder)
    for rel, reason in expected.items():
        assert reason in rejects.loc[rel, "reason"], (rel, rejects.loc[rel, "reason"])
    assert (rejects["reason"].str.contains("LOCALIZER")).sum() == 2
    assert len(rejects) == len(expected) + 2
    assert summary["converted"] == 16 - 2
    assert summary["series"] == 2
    meta = data.read_meta(out)
    row = int(np.flatnonzero(meta["source_file"] == bare.relative_to(folder).as_posix())[0])
    with h5py.File(out) as handle:
        np.testing.assert_array_equal(handle["images"][row, 0], reference)
        assert json.loads(handle.attrs["reject_reasons"])["not DICOM"] == 2


def test_transfer_syntaxes_give_identical_hu(cohort: dict) -> None:
    folder, series = copy_cohort(cohort, "syntaxes")
    uid = sorted(series)[0]
    paths = series[uid]
    reference = {p.relative_to(folder).as_posix(): reference_hu(p) for p in paths}
    for path, syntax in zip(paths, [RLELossless, JPEG2000Lossless] * 4, strict=True):
        ds = pydicom.dcmread(path)
        ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(path)
    # Big endian (retired, but in old archives): swap the pixel bytes by hand, since
    # pydicom writes element values as given.
    big = series[sorted(series)[1]][0]
    ds = pydicom.dcmread(big)
    reference[big.relative_to(folder).as_posix()] = reference_hu(big)
    ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    pydicom.dcmwrite(big, ds, implicit_vr=False, little_endian=False)
    assert pydicom.dcmread(big).file_meta.TransferSyntaxUID == ExplicitVRBigEndian

    summary, rejects, out = run_conversion(folder)
    assert summary["converted"] == 16 and len(rejects) == 2
    meta = data.read_meta(out)
    with h5py.File(out) as handle:
        images = handle["images"][:, 0]
    for rel, hu in reference.items():
        row = int(np.flatnonzero(meta["source_file"] == rel)[0])
        np.testing.assert_array_equal(images[row], hu, err_msg=rel)


def test_lossless_syntaxes_of_one_slice_give_identical_hu(cohort: dict, tmp_path: Path) -> None:
    """The same CT slice stored uncompressed, JPEG-LS, JPEG 2000, RLE and deflated."""
    source = cohort["series"][sorted(cohort["series"])[0]][2]
    reference = reference_hu(source)
    for syntax in (JPEGLSLossless, JPEG2000Lossless, RLELossless, DeflatedExplicitVRLittleEndian):
        folder = tmp_path / syntax.name.split()[0].lower()
        folder.mkdir()
        ds = pydicom.dcmread(source)
        if syntax.is_compressed:
            ds.compress(syntax, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(folder / "slice.dcm")
        assert pydicom.dcmread(folder / "slice.dcm").file_meta.TransferSyntaxUID == syntax
        summary, _, out = run_conversion(folder)
        assert summary["converted"] == 1, syntax.name
        with h5py.File(out) as handle:
            np.testing.assert_array_equal(handle["images"][0, 0], reference, err_msg=syntax.name)


@pytest.mark.parametrize(
    "variant",
    [
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_pydicom_encodings_of_one_image_give_identical_hu(variant: str, tmp_path: Path) -> None:
    """pydicom ships one MR image in several encodings: each converts to the same values."""
    arrays = []
    for name in ("MR_small.dcm", variant):
        source = get_testdata_file(name)
        if source is None:  # pragma: no cover - test data not shipped
            pytest.skip(f"pydicom test file {name} unavailable")
        folder = tmp_path / name.replace(".dcm", "")
        folder.mkdir()
        shutil.copy(source, folder / name)
        summary, _, out = run_conversion(folder, {"modalities": ["MR"]})
        assert summary["converted"] == 1, name
        with h5py.File(out) as handle:
            arrays.append(handle["images"][...])
    np.testing.assert_array_equal(arrays[1], arrays[0])


def test_jpeg_baseline_8bit_within_tolerance(cohort: dict, tmp_path: Path) -> None:
    """Lossy 8-bit JPEG (made with Pillow; pydicom has no JPEG encoder): HU close, not equal."""
    from PIL import Image

    source = cohort["series"][sorted(cohort["series"])[0]][2]
    ds = pydicom.dcmread(source)
    low, step = -1000.0, 2000.0 / 255  # -1000..1000 HU in 256 grey levels
    grey = np.clip(np.rint((reference_hu(source) - low) / step), 0, 255).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(grey).save(encoded, format="JPEG", quality=95)
    ds.PixelData = encapsulate([encoded.getvalue()])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{step:.10f}", str(low)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    folder = tmp_path / "jpeg"
    folder.mkdir()
    ds.save_as(folder / "slice.dcm")
    summary, _, out = run_conversion(folder)
    assert summary["converted"] == 1
    with h5py.File(out) as handle:
        hu = handle["images"][0, 0].astype(np.float64)
    error = np.abs(hu - (grey * step + low))
    assert error.mean() < 2 * step and error.max() < 24 * step, (error.mean(), error.max())


def test_jpeg_extended_12bit_decodes(cohort: dict, tmp_path: Path) -> None:
    """A 12-bit JPEG Extended frame shipped with pydicom, inside one of our CT headers."""
    name = "JPGExtended.dcm"
    shipped = get_testdata_file(name)
    if shipped is None:  # pragma: no cover - test data not shipped
        pytest.skip(f"pydicom test file {name} unavailable")
    jpeg = pydicom.dcmread(shipped)
    ds = pydicom.dcmread(cohort["series"][sorted(cohort["series"])[0]][0])
    ds.PixelData = jpeg.PixelData
    ds["PixelData"].VR = "OB"
    ds.Rows, ds.Columns = jpeg.Rows, jpeg.Columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit
    folder = tmp_path / "jpeg12"
    folder.mkdir()
    ds.save_as(folder / "slice.dcm")
    summary, _, out = run_conversion(folder)
    assert summary["converted"] == 1
    expected = jpeg.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert jpeg.pixel_array.max() > 255  # really more than 8 bits
    with h5py.File(out) as handle:
        np.testing.assert_array_equal(handle["images"][0, 0], expected)


def test_pydicom_test_files(tmp_path: Path) -> None:
    folder = tmp_path / "pydicom"
    expected = {
        "CT_small.dcm": None,
        "693_J2KI.dcm": None,
        "MR_small.dcm": "modality MR",
        "rtstruct.dcm": "non-image SOP class",
    }
    for name in expected:
        source = get_testdata_file(name)
        if source is None:  # pragma: no cover - test data not shipped
            pytest.skip(f"pydicom test file {name} unavailable")
        target = folder / name.replace(".dcm", "") / name
        target.parent.mkdir(parents=True)
        shutil.copy(source, target)
    summary, rejects, out = run_conversion(folder, {"image_size": 64})  # 128 and 512 pixels
    for name, reason in expected.items():
        rel = f"{name.replace('.dcm', '')}/{name}"
        if reason is None:
            assert rel not in rejects.index, rejects.loc[rel, "reason"]
        else:
            assert reason in rejects.loc[rel, "reason"]
    meta = data.read_meta(out)
    assert set(meta["source_file"]) == {"CT_small/CT_small.dcm", "693_J2KI/693_J2KI.dcm"}


def test_monochrome1_inverted_outside_ct() -> None:
    ds = pydicom.Dataset()
    ds.BitsStored, ds.PixelRepresentation = 12, 0
    np.testing.assert_array_equal(invert_monochrome1(np.array([0, 4095, 100]), ds), [4095, 0, 3995])
    ds.PixelRepresentation = 1
    np.testing.assert_array_equal(invert_monochrome1(np.array([-2048, 2047]), ds), [2047, -2048])


def _enhanced_ct(paths: list[Path], target: Path) -> None:
    """One Enhanced CT file from single-frame slices, frames stored in shuffled order."""
    slices = [pydicom.dcmread(p) for p in paths]
    order = np.random.default_rng(0).permutation(len(slices))
    first = slices[0]
    ds = pydicom.Dataset()
    for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows"):
        setattr(ds, keyword, first.get(keyword))
    for keyword in ("Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, keyword, first.get(keyword))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(slices)
    shared = pydicom.Dataset()
    measures, plane, rescale = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    plane.ImageOrientationPatient = first.ImageOrientationPatient
    rescale.RescaleSlope, rescale.RescaleIntercept = first.RescaleSlope, first.RescaleIntercept
    rescale.RescaleType = "HU"
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [plane]
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for index in order:
        item, position = pydicom.Dataset(), pydicom.Dataset()
        position.ImagePositionPatient = slices[index].ImagePositionPatient
        item.PlanePositionSequence = [position]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.stack([slices[i].pixel_array for i in order]).tobytes()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    target.parent.mkdir(parents=True)
    ds.save_as(target, enforce_file_format=True)


def test_enhanced_ct_multiframe(cohort: dict, tmp_path: Path) -> None:
    uid = sorted(cohort["series"])[0]
    paths = cohort["series"][uid]
    folder = tmp_path / "enhanced"
    _enhanced_ct(paths, folder / "ct" / "volume.dcm")
    out, rejects = tmp_path / "enhanced.h5", tmp_path / "enhanced.rejects.csv"
    summary = convert(folder, out, rejects, HU_NATIVE)
    assert summary["files_seen"] == 1
    assert summary["images_seen"] == summary["converted"] == len(paths)
    meta = data.read_meta(out)
    assert list(meta["slice_index"]) == list(range(len(paths)))
    assert (np.diff(meta["z"]) > 0).all()
    with h5py.File(out) as handle:
        images = handle["images"][:, 0]
    for row, path in enumerate(paths):  # paths are sorted by position, like the output
        np.testing.assert_array_equal(images[row], reference_hu(path))
    assert meta["source_file"][0].startswith("ct/volume.dcm#")
