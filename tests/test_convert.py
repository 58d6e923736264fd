"""``python -m medssl.convert``: standalone defaults, options over settings, exit status."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from medssl import convert
from tests.corpus import make_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_cohort(tmp_path_factory)


def test_standalone_cli_defaults(cohort: dict, tmp_path: Path) -> None:
    out = tmp_path / "cli.h5"
    result = subprocess.run(
        [sys.executable, "-m", "medssl.convert", str(cohort["clean"]), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rejects = pd.read_csv(tmp_path / "cli.rejects.csv")
    assert len(rejects) == 2
    with h5py.File(out) as handle:
        assert handle["images"].dtype == np.int16
        assert handle["images"].shape == (16, 1, 32, 32)
        assert handle["images"].attrs["policy"] == "hu"
    help_text = subprocess.run(
        [sys.executable, "-m", "medssl.convert", "--help"], capture_output=True, text=True
    ).stdout
    for word in ("/meta/source_file", "--gap-policy", "--max-reject-fraction", "rejects.csv"):
        assert word in help_text


def test_options_override_single_settings(cohort: dict, tmp_path: Path) -> None:
    out = tmp_path / "o.h5"
    settings = {"intensity": {"policy": "hu"}, "image_size": 32, "compression": "none"}
    argv = ["--dicom-dir", str(cohort["clean"]), "--out", str(out), "--rejects"]
    argv += [str(tmp_path / "o.csv"), "--settings", json.dumps(settings)]
    argv += ["--policy", "window", "--window=-600,1500", "--window", "40,400"]
    argv += ["--image-size", "16", "--compression", "lzf"]
    assert convert.main(argv) == 0
    with h5py.File(out) as handle:
        images = handle["images"]
        assert images.shape == (16, 2, 16, 16) and images.dtype == np.uint8
        assert images.attrs["compression"] == "lzf"
        assert json.loads(images.attrs["channels"]) == [
            {"window": [-600.0, 1500.0]},
            {"window": [40.0, 400.0]},
        ]
    assert len(pd.read_csv(tmp_path / "o.csv")) == 2


def test_cli_empty_folder_exits_nonzero(tmp_path: Path) -> None:
    empty = tmp_path / "empty_dicom"
    empty.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medssl.convert",
            "--dicom-dir",
            str(empty),
            "--out",
            str(tmp_path / "e.h5"),
            "--rejects",
            str(tmp_path / "e.csv"),
            "--settings",
            "{}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"error: convert: {empty}: no usable images" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "e.h5").exists()


def test_missing_folder_or_output_is_one_error_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        assert convert.main(["--out", str(tmp_path / "x.h5")]) == 1
        assert convert.main([str(tmp_path / "missing"), str(tmp_path / "x.h5")]) == 1
    assert caplog.messages == [
        "error: convert: give SRC_DIR and OUT.h5 (or --dicom-dir and --out)",
        f"error: convert: {tmp_path / 'missing'}: DICOM folder does not exist",
    ]
    with pytest.raises(SystemExit) as usage:
        convert.main(["--gap-policy", "splt"])
    assert usage.value.code == 2  # argparse: not one of the choices


def _image_folder(root: Path) -> Path:
    """Three small PNGs and their manifest (one row for a missing file)."""
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (12, 16), dtype=np.uint8)).save(root / f"{name}.png")
    manifest = pd.DataFrame(
        {
            "file": ["a.png", "b.png", "c.png", "gone.png"],
            "patient_id": ["p1", "p1", "p2", "p3"],
            "official_split": ["train", "train", "test", "test"],
            "effusion": [1, 0, 1, 0],
        }
    )
    manifest.to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def test_images_source_cli(tmp_path: Path) -> None:
    manifest = _image_folder(tmp_path / "png")
    out, labels = tmp_path / "png.h5", tmp_path / "png.labels.csv"
    argv = ["-m", "medssl.convert", "--source", "images", "--root", str(tmp_path / "png")]
    argv += ["--manifest", str(manifest), str(out), "--labels-out", str(labels)]
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "3 files, 4 images seen = 3 converted + 1 rejected" in result.stderr
    with h5py.File(out) as handle:
        assert handle["images"].shape == (3, 1, 12, 16)  # standalone: native size
        assert handle["images"].attrs["policy"] == "scale"
    table = pd.read_csv(labels)
    assert list(table["sop_uid"]) == ["a", "b", "c"]
    assert list(table["effusion"]) == [1, 0, 1]
    rejects = pd.read_csv(tmp_path / "png.rejects.csv")
    assert list(rejects["file"]) == ["gone.png"]


def test_bad_manifest_is_one_error_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = _image_folder(tmp_path / "png")
    pd.read_csv(manifest).drop(columns=["patient_id"]).to_csv(manifest, index=False)
    argv = ["--source", "images", "--root", str(tmp_path / "png"), "--manifest", str(manifest)]
    with caplog.at_level(logging.ERROR):
        assert convert.main([*argv, str(tmp_path / "x.h5")]) == 1
    assert caplog.messages == [
        f"error: convert: {manifest}: manifest lacks column(s) patient_id "
        "(has file, official_split, effusion)"
    ]
    assert not (tmp_path / "x.h5").exists()


def test_dicom_preset_writes_labels_of_converted_slices(
    cohort: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preset's scan gives the DICOM folder and a labels table; the labels table
    keeps the converted SOP UIDs and the preset's rejects join the rejects CSV."""
    import types

    from medssl.datasets import presets

    labels = pd.read_csv(cohort["root"] / "labels.csv")
    table = labels[["sop_uid", "patient_id"]].assign(official_split="", nodule=labels["nodule"])
    table = pd.concat([table, pd.DataFrame([{"sop_uid": "1.2.3", "patient_id": "x"}])])
    found = types.SimpleNamespace(
        kind="dicom",
        table=table,
        rejects=[("extra.dcm", "listed, not found")],
        source=cohort["clean"],
    )
    preset = types.SimpleNamespace(scan=lambda root: found)
    monkeypatch.setattr(presets, "look_up_preset", lambda name: preset)
    out = tmp_path / "p.h5"
    argv = ["--preset", "fake", "--root", str(cohort["root"]), str(out)]
    assert convert.main([*argv, "--labels-out", str(tmp_path / "p.labels.csv")]) == 0
    written = pd.read_csv(tmp_path / "p.labels.csv")
    with h5py.File(out) as handle:
        assert list(written["sop_uid"]) == list(handle["meta/sop_uid"].asstr()[...])
    assert "1.2.3" not in set(written["sop_uid"])
    rejects = pd.read_csv(tmp_path / "p.rejects.csv")
    assert "listed, not found" in set(rejects["reason"])


def test_images_preset_converts_its_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from medssl.datasets import presets

    manifest = pd.read_csv(_image_folder(tmp_path / "png"))
    found = types.SimpleNamespace(
        kind="images",
        table=manifest,
        rejects=[("d.png", "listed in the CSV, no such file")],
        source=tmp_path / "png",
    )
    monkeypatch.setattr(
        presets, "look_up_preset", lambda name: types.SimpleNamespace(scan=lambda root: found)
    )
    out = tmp_path / "i.h5"
    argv = ["--preset", "fake", "--root", str(tmp_path), str(out)]
    assert convert.main([*argv, "--labels-out", str(tmp_path / "i.labels.csv")]) == 0
    assert list(pd.read_csv(tmp_path / "i.labels.csv")["sop_uid"]) == ["a", "b", "c"]
    rejects = pd.read_csv(tmp_path / "i.rejects.csv").set_index("file")["reason"]
    assert rejects["d.png"] == "listed in the CSV, no such file"
    assert rejects["gone.png"] == "file listed in the manifest does not exist"
    with h5py.File(out) as handle:
        assert handle.attrs["n_images_seen"] == 5 and handle.attrs["n_rejected"] == 2
