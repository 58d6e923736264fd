"""Mask readers (DICOM-SEG, RTSTRUCT, image folder) on masks built here; writing the file."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medssl.core.registry import UnknownNameError
from medssl.datasets import mask_sources as mk
from medssl.datasets.hdf5 import read_meta
from medssl.dicom.reading import iter_files


@pytest.fixture(scope="module")
def slices(converted_cohort: dict) -> dict:
    """The first patient's first series: SOP UID -> (row, header) in converted order."""
    meta = read_meta(converted_cohort["h5"])
    series = meta["series_uid"].iloc[0]
    rows = meta.index[meta["series_uid"] == series].tolist()
    headers = {}
    for path in iter_files(converted_cohort["dicom"]):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        headers[str(ds.SOPInstanceUID)] = ds
    return {"meta": meta, "series": series, "rows": rows, "headers": headers}


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2


def _file_dataset(sop_class: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def write_seg(path: Path, frames: dict[str, np.ndarray], series_uid: str, label: str) -> None:
    """A minimal binary DICOM-SEG: one segment, one frame per source image."""
    ds = _file_dataset(mk.SEG_STORAGE)
    ds.Modality = "SEG"
    ds.SegmentationType = "BINARY"
    first = next(iter(frames.values()))
    ds.Rows, ds.Columns = first.shape
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit, ds.PixelRepresentation = 0, 0
    segment = Dataset()
    segment.SegmentNumber, segment.SegmentLabel = 1, label
    other = Dataset()
    other.SegmentNumber, other.SegmentLabel = 2, "Heart"
    ds.SegmentSequence = Sequence([segment, other])
    referenced = Dataset()
    referenced.SeriesInstanceUID = series_uid
    ds.ReferencedSeriesSequence = Sequence([referenced])
    groups = []
    for uid in frames:
        source = Dataset()
        source.ReferencedSOPInstanceUID = uid
        derivation = Dataset()
        derivation.SourceImageSequence = Sequence([source])
        ident = Dataset()
        ident.ReferencedSegmentNumber = 1
        group = Dataset()
        group.DerivationImageSequence = Sequence([derivation])
        group.SegmentIdentificationSequence = Sequence([ident])
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    bits = np.stack(list(frames.values())).astype(np.uint8).ravel()
    ds.PixelData = np.packbits(bits, bitorder="little").tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_rtstruct(
    path: Path, contours: list[tuple[str | None, np.ndarray]], name: str, series_uid: str
) -> None:
    """A minimal RT Structure Set: one ROI, closed planar contours (patient mm)."""
    ds = _file_dataset(mk.RTSTRUCT_STORAGE)
    ds.Modality = "RTSTRUCT"
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    study = Dataset()
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    roi = Dataset()
    roi.ROINumber, roi.ROIName = 3, name
    ds.StructureSetROISequence = Sequence([roi])
    items = []
    for uid, points in contours:
        item = Dataset()
        item.ContourGeometricType = "CLOSED_PLANAR"
        item.NumberOfContourPoints = len(points)
        item.ContourData = [f"{v:.4f}" for v in points.ravel()]
        if uid is not None:
            image = Dataset()
            image.ReferencedSOPInstanceUID = uid
            item.ContourImageSequence = Sequence([image])
        items.append(item)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 3
    roi_contour.ContourSequence = Sequence(items)
    ds.ROIContourSequence = Sequence([roi_contour])
    ds.save_as(path, enforce_file_format=True)


def test_seg_reader_attaches_frames_by_sop_uid(slices: dict, converted_cohort: dict, tmp_path):
    rows = slices["rows"][2:5]
    uids = [slices["meta"].at[r, "sop_uid"] for r in rows]
    frames = {uid: _disc((32, 32), (10 + 3 * i, 16), 5) for i, uid in enumerate(uids)}
    write_seg(tmp_path / "seg.dcm", frames, slices["series"], "Lung")
    masks, annotated = mk.build_masks(converted_cohort["h5"], "seg", tmp_path, "lung")
    assert annotated.sum() == len(slices["rows"])  # the whole referenced series
    assert annotated[slices["rows"]].all()
    for row, uid in zip(rows, uids, strict=True):
        np.testing.assert_array_equal(masks[row], frames[uid])
    others = sorted(set(range(len(masks))) - set(rows))
    assert not masks[others].any()
    with pytest.raises(mk.MaskError, match="no 'spleen' annotation"):
        mk.build_masks(converted_cohort["h5"], "seg", tmp_path, "spleen")


def test_rtstruct_contours_are_rasterised_on_the_slice_grid(slices, converted_cohort, tmp_path):
    row, plane_row = slices["rows"][3], slices["rows"][5]
    uid = slices["meta"].at[row, "sop_uid"]
    header = slices["headers"][uid]
    plane_header = slices["headers"][slices["meta"].at[plane_row, "sop_uid"]]
    spacing = np.asarray(header.PixelSpacing, dtype=float)

    def square(ds, top: int, left: int, size: int) -> np.ndarray:
        # A square whose corners sit half a pixel outside pixel centres top..top+size-1.
        origin = np.asarray(ds.ImagePositionPatient, dtype=float)
        corners = [(top, left), (top, left + size), (top + size, left + size), (top + size, left)]
        return np.array(
            [origin + [(c - 0.5) * spacing[1], (r - 0.5) * spacing[0], 0] for r, c in corners]
        )

    outer, hole = square(header, 4, 6, 12), square(header, 8, 10, 4)
    write_rtstruct(
        tmp_path / "rs.dcm",
        [(uid, outer), (uid, hole), (None, square(plane_header, 20, 20, 6))],
        "LUNG",
        slices["series"],
    )
    masks, annotated = mk.build_masks(
        converted_cohort["h5"], "rtstruct", tmp_path, "lung", converted_cohort["dicom"]
    )
    expected = np.zeros((32, 32), dtype=np.uint8)
    expected[4:16, 6:18] = 1
    expected[8:12, 10:14] = 0  # the inner contour is a hole
    np.testing.assert_array_equal(masks[row], expected)
    expected_plane = np.zeros((32, 32), dtype=np.uint8)
    expected_plane[20:26, 20:26] = 1  # found by its plane: no ContourImageSequence
    np.testing.assert_array_equal(masks[plane_row], expected_plane)
    assert annotated[slices["rows"]].all() and annotated.sum() == len(slices["rows"])


def test_folder_reader_by_sop_uid_and_by_series_slice(slices, converted_cohort, tmp_path):
    root = tmp_path / "png" / "liver"
    (root / slices["series"]).mkdir(parents=True)
    by_uid, by_index = slices["rows"][1], slices["rows"][6]
    disc = _disc((32, 32), (16, 16), 6)
    image = Image.fromarray(np.where(disc, 255, 0).astype(np.uint8))
    image.save(root / f"{slices['meta'].at[by_uid, 'sop_uid']}.png")
    index = int(slices["meta"].at[by_index, "slice_index"])
    image.save(root / slices["series"] / f"{index}.png")
    masks, annotated = mk.build_masks(converted_cohort["h5"], "folder", tmp_path / "png", "liver")
    assert set(np.flatnonzero(annotated)) == {by_uid, by_index}
    np.testing.assert_array_equal(masks[by_uid], disc)
    np.testing.assert_array_equal(masks[by_index], disc)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "1.2.3.unknown.png")
    with pytest.raises(mk.MaskError, match=r"liver: 1 mask file\(s\) match no converted slice"):
        mk.build_masks(converted_cohort["h5"], "folder", tmp_path / "png", "liver")


def test_masks_get_the_images_resize(slices, converted_cohort, tmp_path):
    """A 64 x 64 native mask on 32 x 32 slices is area-averaged and thresholded."""
    native = np.zeros((64, 64), dtype=bool)
    native[10:30, 20:50] = True
    stored = mk.to_stored_grid(native, 32, 32, "test")
    expected = np.zeros((32, 32), dtype=np.uint8)
    expected[5:15, 10:25] = 1
    np.testing.assert_array_equal(stored, expected)


def test_unknown_format_names_the_known_ones(converted_cohort: dict, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="unknown mask format 'rtstuct'; did you mean"):
        mk.build_masks(converted_cohort["h5"], "rtstuct", tmp_path, "lung")


def test_write_masks_layout(converted_cohort: dict, tmp_path: Path) -> None:
    """Row i of the mask file is row i of the dataset; one LZF chunk per slice."""
    masks, annotated = mk.build_masks(
        converted_cohort["h5"], "folder", converted_cohort["masks_dir"], "lung"
    )
    out = tmp_path / "lung.h5"
    mk.write_masks(out, masks, annotated, {"structure": "lung", "settings": {"a": 1}})
    with h5py.File(out, "r") as handle:
        assert handle["masks"].chunks == (1, 32, 32)
        assert handle["masks"].compression == "lzf"
        np.testing.assert_array_equal(handle["masks"][...], masks)
        np.testing.assert_array_equal(handle["annotated"][...], annotated)
        assert handle.attrs["structure"] == "lung"
        assert handle.attrs["settings"] == '{"a": 1}'
    assert len(masks) == len(read_meta(converted_cohort["h5"]))


# --------------------------------------------------------- preset and RLE masks


def write_image_h5(
    path: Path, files: list[str], sops: list[str], size: int, natives: list[tuple[int, int]]
) -> Path:
    """A converted dataset of 2-D images as the convert stage writes it (metadata only matters)."""
    string = h5py.string_dtype()
    with h5py.File(path, "w") as handle:
        handle.create_dataset("images", data=np.zeros((len(files), 1, size, size), np.uint8))
        meta = handle.create_group("meta")
        for name, values in (
            ("patient_id", [f"p{i}" for i in range(len(files))]),
            ("sop_uid", sops),
            ("source_file", files),
        ):
            meta.create_dataset(name, data=np.array(values, dtype=object), dtype=string)
        meta.create_dataset("original_shape", data=np.array(natives, dtype=np.int32))
    return path


def test_preset_masks_montgomery_lungs_on_the_stored_grid(tmp_path: Path) -> None:
    from tests.datasets.replicas import montgomery

    facts = montgomery(tmp_path / "release")
    files = sorted(facts["lungs"])[:4]  # a dataset converted from part of the release
    h5 = write_image_h5(
        tmp_path / "m.h5", files, [Path(f).stem for f in files], 24, [(48, 40)] * len(files)
    )
    masks, annotated = mk.build_masks(
        h5, "preset", tmp_path / "release", "lung", preset="montgomery"
    )
    assert annotated.all() and masks.shape == (4, 24, 24)
    for row, file in enumerate(files):
        np.testing.assert_array_equal(
            masks[row], mk.to_stored_grid(facts["lungs"][file], 24, 24, "")
        )
        assert masks[row].sum() > 50


def test_preset_masks_need_the_preset_and_a_known_structure(tmp_path: Path) -> None:
    from tests.datasets.replicas import drive

    drive(tmp_path / "release")
    h5 = write_image_h5(tmp_path / "d.h5", ["test/images/01_test.tif"], ["01_test"], 16, [(36, 34)])
    with pytest.raises(mk.MaskError, match="needs the preset's name"):
        mk.build_masks(h5, "preset", tmp_path / "release", "vessel")
    with pytest.raises(ValueError, match="no masks of structure 'lung'; has vessel, fov"):
        mk.build_masks(h5, "preset", tmp_path / "release", "lung", preset="drive")
    # the Grand Challenge copy has no test vessel masks: nothing to attach
    with pytest.raises(mk.MaskError, match="no 'vessel' annotation matches"):
        mk.build_masks(h5, "preset", tmp_path / "release", "vessel", preset="drive")
    masks, annotated = mk.build_masks(h5, "preset", tmp_path / "release", "fov", preset="drive")
    assert annotated.all() and masks[0].mean() > 0.5


def test_a_mask_of_another_size_than_its_image_is_an_error(tmp_path: Path) -> None:
    from tests.datasets.replicas import montgomery

    montgomery(tmp_path / "release")
    h5 = write_image_h5(
        tmp_path / "m.h5", ["CXR_png/MCUCXR_0001_0.png"], ["MCUCXR_0001_0"], 24, [(50, 40)]
    )
    with pytest.raises(mk.MaskError, match="mask is 48x40 but the image was 50x40"):
        mk.build_masks(h5, "preset", tmp_path / "release", "lung", preset="montgomery")


def test_rle_masks_by_sop_uid_union_and_empty(tmp_path: Path) -> None:
    from tests.datasets.replicas import siim

    facts = siim(tmp_path / "release")
    sops = sorted(facts["masks"])
    h5 = write_image_h5(
        tmp_path / "s.h5", [f"{s}.dcm" for s in sops], sops, 64, [(64, 64)] * len(sops)
    )
    for source in (tmp_path / "release", tmp_path / "release" / "train-rle.csv"):
        masks, annotated = mk.build_masks(h5, "rle", source, "pneumothorax")
        assert annotated.all()  # "-1" rows annotate an empty image
        for row, sop in enumerate(sops):
            np.testing.assert_array_equal(masks[row], facts["masks"][sop])
    assert {bool(m.any()) for m in masks} == {True, False}
    same, _ = mk.build_masks(h5, "preset", tmp_path / "release", "pneumothorax", preset="siim")
    np.testing.assert_array_equal(same, masks)
    with pytest.raises(mk.MaskError, match="run-length mask table not found"):
        mk.build_masks(h5, "rle", tmp_path, "pneumothorax")
