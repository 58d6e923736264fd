"""The fast header/pixel path gives what pydicom gives, and leaves every odd file to pydicom."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from medssl.datasets import synthetic as synth
from medssl.dicom import reading as dicom
from medssl.dicom.rawheader import read_raw_header, read_raw_pixels

COHORT = {"patients": 1, "series_per_patient": 1, "slices": 4, "matrix": 32, "seed": 7}


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("raw")
    synth.synthesize(root / "dicom", root / "labels.csv", COHORT)
    return sorted(
        p
        for p in (root / "dicom").rglob("*.dcm")
        if "LOCALIZER" not in pydicom.dcmread(p, stop_before_pixels=True).ImageType
    )


def _pydicom_header(path: Path, monkeypatch: pytest.MonkeyPatch) -> dicom.SliceHeader:
    with monkeypatch.context() as patch:
        patch.setattr(dicom, "read_raw_header", lambda _: None)
        header = dicom.read_header(path, path.parent, ["CT"])
    assert isinstance(header, dicom.SliceHeader)
    return header


def _assert_same(path: Path, monkeypatch: pytest.MonkeyPatch) -> dicom.SliceHeader:
    """Fast and pydicom headers agree on every field, and give identical HU."""
    fast = dicom.read_header(path, path.parent, ["CT"])
    slow = _pydicom_header(path, monkeypatch)
    assert isinstance(fast, dicom.SliceHeader) and fast.pixels is not None
    assert slow.pixels is None
    plain = {"pixels": None, "padding": None, "rescale": None}
    assert dataclasses.replace(fast, **plain) == dataclasses.replace(slow, **plain)
    hu_fast, hu_slow = dicom.read_slice_hu(fast), dicom.read_slice_hu(slow)
    assert hu_fast.dtype == hu_slow.dtype
    np.testing.assert_array_equal(hu_fast, hu_slow)
    return fast


def test_fast_path_matches_pydicom(slices: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    for path in slices:
        header = _assert_same(path, monkeypatch)
        assert header.pixels.dtype == "<u2" and header.pixels.bits_stored == 12


def test_implicit_vr_and_undefined_length_sequences(
    slices: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = pydicom.dcmread(slices[0])
    item = pydicom.Dataset()
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    nested = pydicom.Dataset()
    nested.CodeValue = "X"
    item.PurposeOfReferenceCodeSequence = Sequence([nested])
    ds.ReferencedImageSequence = Sequence([item])
    ds["ReferencedImageSequence"].is_undefined_length = True
    explicit = tmp_path / "explicit.dcm"
    ds.save_as(explicit)
    _assert_same(explicit, monkeypatch)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = tmp_path / "implicit.dcm"
    ds.save_as(implicit, implicit_vr=True, little_endian=True)
    _assert_same(implicit, monkeypatch)


def test_stored_bits_masked_and_padding_is_air(
    slices: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = pydicom.dcmread(slices[0])
    stored = ds.pixel_array.astype(np.int16) - 2048  # signed 12-bit values
    stored[0, :4] = [-2048, 2047, -1, 0]
    garbage = stored.view(np.uint16) | np.uint16(0x7000)  # junk above BitsStored
    garbage[0, 0] = 0x0800 | 0xF000  # -2048 with the high bits set: padding below
    ds.PixelRepresentation = 1
    ds.PixelData = garbage.astype("<u2").tobytes()
    ds.PixelPaddingValue = -2048
    ds["PixelPaddingValue"].VR = "SS"
    path = tmp_path / "signed.dcm"
    ds.save_as(path)
    header = _assert_same(path, monkeypatch)
    raw = read_raw_pixels(header.path, header.pixels, header.rows, header.columns)
    np.testing.assert_array_equal(raw, pydicom.dcmread(path).pixel_array)
    hu = dicom.read_slice_hu(header)
    assert hu[0, 0] == -1000  # padding -> air
    assert hu[0, 1] == 2047 + float(ds.RescaleIntercept)


def test_unusual_files_are_left_to_pydicom(slices: list[Path], tmp_path: Path) -> None:
    source = slices[0]
    assert read_raw_header(str(source)) is not None
    cases: dict[str, Path] = {}

    bare = tmp_path / "bare.dcm"  # no preamble
    bare.write_bytes(source.read_bytes()[132:])
    cases["no preamble"] = bare

    ds = pydicom.dcmread(source)
    ds.compress(RLELossless, generate_instance_uid=False)
    cases["RLE"] = tmp_path / "rle.dcm"
    ds.save_as(cases["RLE"])

    ds = pydicom.dcmread(source)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    cases["deflate"] = tmp_path / "deflate.dcm"
    ds.save_as(cases["deflate"])

    ds = pydicom.dcmread(source)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientID = "Müller"
    cases["latin-1"] = tmp_path / "latin1.dcm"
    ds.save_as(cases["latin-1"])

    cut = tmp_path / "cut.dcm"
    cut.write_bytes(source.read_bytes()[:-10])
    cases["truncated pixels"] = cut

    big = get_testdata_file("MR_small_bigendian.dcm")
    if big is not None:
        cases["big endian"] = Path(big)
    for name, path in cases.items():
        assert read_raw_header(str(path)) is None, name
    # ...and pydicom still reads the readable ones (the corpus tests check reasons).
    header = dicom.read_header(cases["deflate"], tmp_path, ["CT"])
    assert isinstance(header, dicom.SliceHeader) and header.pixels is None
