"""Image files -> HDF5: bit depths kept, colour policies, EXIF orientation, every file
accounted for, and the labels table."""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from medssl.datasets import hdf5 as data
from medssl.datasets.sources import ManifestError, convert_images

NATIVE = {"image_size": None}


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], top: int) -> np.ndarray:
    """Smooth random content (gradients plus noise) in 0..top, as the given shape."""
    rows, cols = np.meshgrid(
        np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij"
    )
    base = (rows + cols) / 2
    if len(shape) == 3:
        base = np.stack([base, 1 - base, rows], axis=-1)
    noisy = base * 0.8 + 0.2 * rng.random(shape)
    return np.rint(noisy * top)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One file of each kind, damaged ones included, and the manifest."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    grey8 = _smooth(rng, (20, 30), 255).astype(np.uint8)
    grey16 = _smooth(rng, (24, 18), 60000).astype(np.uint16)
    colour = _smooth(rng, (16, 16, 3), 255).astype(np.uint8)
    Image.fromarray(grey8).save(root / "grey8.png")
    Image.fromarray(grey16).save(root / "grey16.png")
    Image.fromarray(colour).save(root / "colour.jpg", quality=95)
    (root / "sub").mkdir()
    Image.fromarray(grey8[:, :20]).save(root / "sub" / "scan.tif")
    Image.fromarray(colour).convert("P").save(root / "palette.gif")
    Image.fromarray(colour).save(root / "bitmap.bmp")
    # EXIF orientation 6: the stored 10 x 22 pixels are shown turned, as 22 x 10.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_smooth(rng, (10, 22), 255).astype(np.uint8)).save(
        root / "rotated.jpg", exif=exif, quality=95
    )
    whole = io.BytesIO()
    Image.fromarray(grey8).save(whole, format="PNG")
    (root / "truncated.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    Image.fromarray(grey8).save(root / "unlisted.png")
    (root / "README.txt").write_text("not an image")
    rows = [
        ("grey8.png", "p1", "s1", "", "train", 1),
        ("grey16.png", "p1", "s1", "", "train", 0),
        ("colour.jpg", "p2", "", "", "val", 1),
        ("sub/scan.tif", "p3", "", "", "test", 0),
        ("palette.gif", "p3", "", "", "test", 1),
        ("bitmap.bmp", "p4", "", "", "", 0),
        ("rotated.jpg", "p4", "", "", "", 1),
        ("truncated.png", "p5", "", "", "", 0),
        ("empty.png", "p5", "", "", "", 1),
        ("missing.png", "p6", "", "", "", 0),
        ("grey8.png", "p7", "", "dup", "", 1),
        ("bitmap.bmp", "p7", "", "dup", "", 0),
    ]
    manifest = pd.DataFrame(
        rows, columns=["file", "patient_id", "study_id", "image_id", "official_split", "finding"]
    )
    manifest.to_csv(root / "manifest.csv", index=False)
    return {"root": root, "manifest": manifest, "grey8": grey8, "grey16": grey16}


def _convert(folder: dict, tmp_path: Path, settings: dict, **kwargs) -> tuple[dict, Path]:
    out = tmp_path / "out.h5"
    summary = convert_images(
        folder["root"],
        folder["root"] / "manifest.csv",
        out,
        tmp_path / "rejects.csv",
        settings,
        labels_out=tmp_path / "labels.csv",
        **kwargs,
    )
    return summary, out


def _row(out: Path, image_id: str) -> tuple[np.ndarray, dict]:
    """The stored row of one image and its geometry columns."""
    with h5py.File(out) as handle:
        ids = list(handle["meta/sop_uid"].asstr()[...])
        k = ids.index(image_id)
        meta = {n: handle["meta"][n][k] for n in data.GEOMETRY_META}
        return handle["images"][k], meta


def _inside(stored: np.ndarray, meta: dict) -> np.ndarray:
    """The part of a stored row that holds the native image (no padding)."""
    (top, left), (h, w) = meta["pad_offset"], meta["resized_shape"]
    return stored[..., top : top + h, left : left + w]


def test_every_file_converted_or_rejected_with_its_reason(folder: dict, tmp_path: Path) -> None:
    summary, out = _convert(folder, tmp_path, NATIVE, scan=True)
    rejects = pd.read_csv(tmp_path / "rejects.csv").set_index("file")["reason"]
    assert rejects["truncated.png"].startswith("unreadable or truncated file")
    assert rejects["empty.png"] == "zero-size file"
    assert rejects["missing.png"] == "file listed in the manifest does not exist"
    assert rejects["unlisted.png"] == "file in the folder has no manifest row (folder scan)"
    dup = pd.read_csv(tmp_path / "rejects.csv").query("reason.str.startswith('duplicated')")
    assert sorted(dup["file"]) == ["bitmap.bmp", "grey8.png"]
    assert "README.txt" not in rejects.index  # a file, not an image
    assert summary["converted"] == 7 and summary["rejected"] == 6
    assert summary["images_seen"] == summary["converted"] + summary["rejected"] == 13
    # 9 distinct listed files that exist, then unlisted.png, README.txt, manifest.csv
    assert summary["files_seen"] == 12
    with h5py.File(out) as handle:
        assert handle.attrs["n_converted"] + handle.attrs["n_rejected"] == 13
        assert handle.attrs["source"] == "images"
        assert len(handle["images"]) == 7


def test_bit_depths_kept_and_scaled_to_unit_range(folder: dict, tmp_path: Path) -> None:
    _, out = _convert(folder, tmp_path, NATIVE)
    with h5py.File(out) as handle:
        images = handle["images"]
        assert images.dtype == np.uint16  # one 16-bit image makes the dataset 16-bit
        assert images.shape[2:] == (24, 30)  # padded to the largest height and width
        assert images.attrs["policy"] == "scale"
    stored, meta = _row(out, "grey16")
    np.testing.assert_array_equal(_inside(stored[0], meta), folder["grey16"])
    assert stored[0].max() > 255  # not cut to 8 bits
    assert tuple(meta["original_shape"]) == (24, 18) and tuple(meta["pad_offset"]) == (0, 6)
    stored, meta = _row(out, "grey8")
    np.testing.assert_array_equal(_inside(stored[0], meta), folder["grey8"].astype(np.uint16) * 257)
    with h5py.File(out) as handle:
        k = list(handle["meta/sop_uid"].asstr()[...]).index("grey8")
    model = data.load_images(out, [k])[0, 0].numpy()
    np.testing.assert_allclose(_inside(model, meta), folder["grey8"] / 255.0, atol=1e-6)
    assert (model == 0).sum() >= model.size - 20 * 30  # padding is background 0


def test_rgb_grey_is_luminance_and_keep_is_three_channels(folder: dict, tmp_path: Path) -> None:
    with Image.open(folder["root"] / "colour.jpg") as image:
        colour = np.asarray(image.convert("RGB"))
        luminance = np.asarray(image.convert("RGB").convert("L"))
    _, grey_out = _convert(folder, tmp_path / "grey", {**NATIVE, "rgb": "grey"})
    stored, meta = _row(grey_out, "colour")
    assert stored.shape[0] == 1
    np.testing.assert_array_equal(_inside(stored[0], meta), luminance.astype(np.uint16) * 257)
    _, keep_out = _convert(folder, tmp_path / "keep", {**NATIVE, "rgb": "keep"})
    stored, meta = _row(keep_out, "colour")
    np.testing.assert_array_equal(
        _inside(stored, meta), colour.transpose(2, 0, 1).astype(np.uint16) * 257
    )
    grey16, meta = _row(keep_out, "grey16")  # a grey image repeated to three channels
    np.testing.assert_array_equal(_inside(grey16, meta), np.stack([folder["grey16"]] * 3))
    with h5py.File(keep_out) as handle:
        assert len(json.loads(handle["images"].attrs["channels"])) == 3


def test_tiff_gif_bmp_and_exif_orientation(folder: dict, tmp_path: Path) -> None:
    _, out = _convert(folder, tmp_path, NATIVE)
    stored, meta = _row(out, "sub/scan")
    np.testing.assert_array_equal(
        _inside(stored[0], meta), folder["grey8"][:, :20].astype(np.uint16) * 257
    )
    for name, file in (("palette", "palette.gif"), ("bitmap", "bitmap.bmp")):
        stored, meta = _row(out, name)
        with Image.open(folder["root"] / file) as image:
            expected = np.asarray(image.convert("RGB").convert("L"))
        assert tuple(meta["original_shape"]) == (16, 16)
        np.testing.assert_array_equal(_inside(stored[0], meta), expected.astype(np.uint16) * 257)
    stored, meta = _row(out, "rotated")
    assert tuple(meta["original_shape"]) == (22, 10)  # upright, as EXIF says
    with Image.open(folder["root"] / "rotated.jpg") as image:
        upright = np.asarray(ImageOps.exif_transpose(image).convert("L"))
    assert upright.shape == (22, 10)
    np.testing.assert_array_equal(_inside(stored[0], meta), upright.astype(np.uint16) * 257)


def test_labels_table_matches_the_manifest(folder: dict, tmp_path: Path) -> None:
    _, out = _convert(folder, tmp_path, NATIVE)
    labels = pd.read_csv(tmp_path / "labels.csv", dtype={"official_split": str}).fillna("")
    with h5py.File(out) as handle:
        assert list(labels["sop_uid"]) == list(handle["meta/sop_uid"].asstr()[...])
    assert list(labels.columns) == ["sop_uid", "patient_id", "official_split", "finding"]
    manifest = folder["manifest"]
    default = manifest["file"].str.rsplit(".", n=1).str[0]
    manifest = manifest.assign(
        image_id=manifest["image_id"].where(manifest["image_id"] != "", default)
    )
    expected = manifest.set_index("image_id").loc[labels["sop_uid"]]
    assert list(labels["finding"]) == list(expected["finding"])
    assert list(labels["patient_id"]) == list(expected["patient_id"])
    assert list(labels["official_split"]) == list(expected["official_split"])


def test_workers_give_the_same_dataset(folder: dict, tmp_path: Path) -> None:
    _, one = _convert(folder, tmp_path / "one", {**NATIVE, "image_size": 16})
    _, two = _convert(folder, tmp_path / "two", {**NATIVE, "image_size": 16}, threads=2)
    with h5py.File(one) as a, h5py.File(two) as b:
        np.testing.assert_array_equal(a["images"][...], b["images"][...])
        for name in ("sop_uid", "pad_offset", "resized_shape"):
            np.testing.assert_array_equal(a["meta"][name][...], b["meta"][name][...])
        # image_size with fit pad: the long side is 16, the short one padded
        assert tuple(
            a["meta/resized_shape"][list(a["meta/sop_uid"].asstr()[...]).index("grey8")]
        ) == (
            11,
            16,
        )


def test_bad_manifest_names_the_missing_column(folder: dict, tmp_path: Path) -> None:
    bad = folder["manifest"].drop(columns=["patient_id"])
    with pytest.raises(ManifestError, match="manifest lacks column\\(s\\) patient_id"):
        convert_images(folder["root"], bad, tmp_path / "x.h5", tmp_path / "x.csv", NATIVE)
    assert not (tmp_path / "x.h5").exists()
