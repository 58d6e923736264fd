"""Dataset presets on miniature replicas of each release, and SIIM's run-length code."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medssl.core.registry import UnknownNameError
from medssl.datasets.maskfile import MaskError
from medssl.datasets.presets import PRESETS, PresetError, look_up_preset
from medssl.datasets.presets.chestxray14 import FINDINGS
from medssl.datasets.presets.chexpert import IGNORE, LSR_RANGE, OBSERVATIONS
from medssl.datasets.presets.rle import decode_rle, encode_rle
from medssl.datasets.presets.siim import rle_masks
from tests.datasets import replicas


def scan(name: str, tmp_path: Path, **options):
    facts = replicas.WRITERS[name](tmp_path / name)
    return look_up_preset(name).scan(tmp_path / name, **options), facts


def test_every_preset_has_a_replica_and_unknown_names_get_the_closest() -> None:
    assert set(replicas.WRITERS) == set(PRESETS)
    with pytest.raises(UnknownNameError, match="did you mean 'chexpert'"):
        look_up_preset("chexprt")


def test_chestxray14_findings_lists_and_rejects(tmp_path: Path) -> None:
    manifest, facts = scan("chestxray14", tmp_path)
    table = manifest.table.set_index("image_id")
    assert manifest.kind == "images" and manifest.label_columns == list(FINDINGS)
    assert len(table) == 20 and table.index.is_unique
    for name, findings in facts["labels"].items():
        assert {f for f in FINDINGS if table.at[name, f] == 1} == findings
    assert (table.loc["00000001_000.png", list(FINDINGS)].sum()) == len(
        facts["labels"]["00000001_000.png"]
    )
    assert set(table.index[table["official_split"] == "test"]) == set(facts["test"])
    assert set(table["official_split"]) == {"train", "test"}  # no official val
    assert table.at["00000007_001.png", "patient_id"] == "00000007"
    assert table.at["00000009_000.png", "file"] == "images_002/images/00000009_000.png"
    assert all((manifest.source / f).is_file() for f in table["file"])
    reasons = dict(manifest.rejects)
    assert "no image file" in reasons["00000099_000.png"]
    assert (
        "'Finding Labels'" in reasons["00000097_000.png"] and "Covid" in reasons["00000097_000.png"]
    )
    assert "no row" in reasons["images_002/images/00000098_000.png"]


def test_chestxray14_flat_images_folder_and_the_2020_table(tmp_path: Path) -> None:
    replicas.chestxray14(tmp_path)
    (tmp_path / "images").mkdir()
    for path in tmp_path.glob("images_*/images/*.png"):
        shutil.move(path, tmp_path / "images" / path.name)
    (tmp_path / "Data_Entry_2017.csv").rename(tmp_path / "Data_Entry_2017_v2020.csv")
    manifest = look_up_preset("chestxray14").scan(tmp_path)
    assert len(manifest.table) == 20
    assert manifest.table["file"].str.startswith("images/").all()


def test_chexpert_paths_patients_splits_and_rejects(tmp_path: Path) -> None:
    manifest, facts = scan("chexpert", tmp_path)
    table = manifest.table
    assert manifest.source == facts["release"]
    assert table["file"].str.match(r"^(train|valid)/patient\d{5}/study1/view\d_\w+\.jpg$").all()
    assert all((manifest.source / f).is_file() for f in table["file"])
    assert set(table.loc[table["official_split"] == "val", "patient_id"]) == {
        "patient64541",
        "patient64542",
        "patient64543",
    }
    assert "test" not in set(table["official_split"])
    assert table["image_id"].is_unique
    lateral = table["file"].str.contains("lateral")
    assert lateral.sum() == 2
    reasons = {f: r for f, r in manifest.rejects}
    assert "'Cardiomegaly'" in reasons["train/patient00009/study1/view1_frontal.jpg"]
    assert "no image file" in reasons["train/patient00010/study1/view1_frontal.jpg"]
    frontal, _ = scan("chexpert", tmp_path / "again", frontal_only=True)
    assert len(frontal.table) == len(table) - 2


def _raw_chexpert_values(facts: dict) -> dict[str, list[str]]:
    """The file's observation values as written (text), per manifest file."""
    raw = {}
    for rows in facts["rows"].values():
        for row in rows:
            raw[row[0].split("/", 1)[1]] = row[5:]
    return raw


@pytest.mark.parametrize(
    ("policy", "uncertain_value"), [("u_ones", 1), ("u_zeros", 0), ("ignore", IGNORE)]
)
def test_chexpert_uncertainty_policies(tmp_path: Path, policy: str, uncertain_value: int) -> None:
    manifest, facts = scan("chexpert", tmp_path, uncertainty=policy)
    raw = _raw_chexpert_values(facts)
    seen = set()
    for row in manifest.table.to_dict("records"):
        for column, text in zip(OBSERVATIONS, raw[row["file"]], strict=True):
            expected = {"1.0": 1, "0.0": 0, "": 0, "-1.0": uncertain_value}[text]
            assert row[column] == expected, (row["file"], column, text)
            seen.add(text)
    assert seen == {"1.0", "0.0", "", "-1.0"}


def test_chexpert_lsr_ones_is_seeded_uniform(tmp_path: Path) -> None:
    first, facts = scan("chexpert", tmp_path / "a", uncertainty="lsr_ones", seed=3)
    again, _ = scan("chexpert", tmp_path / "b", uncertainty="lsr_ones", seed=3)
    other, _ = scan("chexpert", tmp_path / "c", uncertainty="lsr_ones", seed=4)
    raw = _raw_chexpert_values(facts)
    uncertain = np.array([[v == "-1.0" for v in raw[f]] for f in first.table["file"]])
    values = first.table[list(OBSERVATIONS)].to_numpy()
    assert uncertain.sum() > 10
    assert ((values[uncertain] > LSR_RANGE[0]) & (values[uncertain] < LSR_RANGE[1])).all()
    assert set(np.unique(values[~uncertain])) <= {0.0, 1.0}
    np.testing.assert_array_equal(values, again.table[list(OBSERVATIONS)].to_numpy())
    assert not np.array_equal(values, other.table[list(OBSERVATIONS)].to_numpy())


def test_chexpert_options_are_checked(tmp_path: Path) -> None:
    replicas.chexpert(tmp_path)
    with pytest.raises(PresetError, match="uncertainty 'maybe' is not one of"):
        look_up_preset("chexpert").scan(tmp_path, uncertainty="maybe")
    with pytest.raises(PresetError, match=r"unknown preset_options \['frontal'\]; known: "):
        look_up_preset("chexpert").scan(tmp_path, frontal=True)


@pytest.mark.parametrize("name", ["shenzhen", "montgomery"])
def test_tuberculosis_label_from_the_file_name(tmp_path: Path, name: str) -> None:
    manifest, facts = scan(name, tmp_path)
    table = manifest.table
    assert (
        dict(zip(table["file"].str.removeprefix("CXR_png/"), table["tuberculosis"], strict=True))
        == facts["labels"]
    )
    assert set(table["tuberculosis"]) == {0, 1}
    assert (table["official_split"] == "").all() and table["patient_id"].is_unique
    assert table["patient_id"].str.fullmatch(r"(CHN|MCU)CXR_\d{4}").all()
    if name == "shenzhen":
        assert manifest.rejects == [
            ("CXR_png/CHNCXR_0099.png", "name is not CHNCXR_<number>_<0|1>.png")
        ]


def test_montgomery_lung_masks_join_left_and_right(tmp_path: Path) -> None:
    _, facts = scan("montgomery", tmp_path)
    masks = look_up_preset("montgomery").masks(tmp_path / "montgomery", "lung")
    assert set(masks) == set(facts["lungs"])
    for key, mask in masks.items():
        np.testing.assert_array_equal(mask, facts["lungs"][key])
    with pytest.raises(PresetError, match="no masks of structure 'heart'; has lung"):
        look_up_preset("montgomery").masks(tmp_path / "montgomery", "heart")
    shutil.rmtree(facts["release"] / "ManualMask" / "rightMask")
    with pytest.raises(PresetError, match=r"no ManualMask/rightMask/"):
        look_up_preset("montgomery").masks(tmp_path / "montgomery", "lung")


@pytest.mark.parametrize("test_manual", [False, True])
def test_drive_splits_and_vessel_fov_masks(tmp_path: Path, test_manual: bool) -> None:
    facts = replicas.drive(tmp_path, test_manual=test_manual)
    preset = look_up_preset("drive")
    manifest = preset.scan(tmp_path)
    counts = manifest.table["official_split"].value_counts().to_dict()
    assert counts == {"train": 6, "test": 4} and manifest.mask_structures == ["vessel", "fov"]
    assert manifest.rejects == [
        ("training/images/27_training.tif", "no training/1st_manual/27_manual1.gif")
    ]
    for structure in ("vessel", "fov"):
        masks = preset.masks(tmp_path, structure)
        assert set(masks) == set(facts[structure])
        for key, mask in masks.items():
            np.testing.assert_array_equal(mask, facts[structure][key])
    assert any(k.startswith("test/") for k in preset.masks(tmp_path, "vessel")) == test_manual


def test_siim_labels_patients_and_rejects(tmp_path: Path) -> None:
    manifest, facts = scan("siim", tmp_path)
    table = manifest.table.set_index("sop_uid")
    assert manifest.kind == "dicom" and manifest.source.name == "dicom-images-train"
    assert table["pneumothorax"].to_dict() == facts["labels"]
    assert table.loc[next(iter(facts["labels"])), "patient_id"] == "pid-000"
    reasons = [r for _, r in manifest.rejects]
    assert len(reasons) == 2
    assert any("no row in train-rle.csv" in r for r in reasons)
    assert any(facts["missing"] in r for r in reasons)


def test_rsna_pe_keys_and_label_value_rejects(tmp_path: Path) -> None:
    manifest, facts = scan("rsna_pe", tmp_path)
    assert manifest.kind == "dicom" and len(manifest.table) == 9 * 2 - 1
    assert facts["bad"] not in set(manifest.table["sop_uid"])
    reasons = dict(manifest.rejects)
    bad = next(r for f, r in reasons.items() if facts["bad"] in f)
    assert "column 'pe_present_on_image' has 2, not 0 or 1" in bad
    assert any(facts["missing"] in f and "no image file" in r for f, r in reasons.items())
    study = manifest.table.groupby("patient_id")["sop_uid"].size()
    assert len(study) == 9


def test_covid_ct_lists_and_patient_rule(tmp_path: Path) -> None:
    manifest, facts = scan("covid_ct", tmp_path)
    table = manifest.table.set_index("file")
    assert table["official_split"].to_dict() == facts["split_of"]
    assert (
        table.loc["CT_NonCOVID/7%0.jpg", "patient_id"]
        == table.loc["CT_NonCOVID/7%1.jpg", "patient_id"]
    )
    assert table.loc["CT_NonCOVID/7%0.jpg", "patient_id"] == "CT_NonCOVID/7"
    assert table.loc["CT_COVID/2020.03.01.1234-p3-7%1.png", "covid"] == 1
    assert table.loc["CT_NonCOVID/8.png", "covid"] == 0
    assert {f for f, _ in manifest.rejects} == {
        "CT_COVID/missing_COVID.png",
        "CT_NonCOVID/missing_NonCOVID.png",
    }


def test_organsmnist_and_lidc(tmp_path: Path) -> None:
    manifest, _ = scan("organsmnist", tmp_path)
    assert manifest.kind == "npz" and manifest.source.name == "organsmnist.npz"
    lidc, facts = scan("lidc", tmp_path)
    assert lidc.kind == "dicom" and lidc.source.name == "LIDC-IDRI" and lidc.table.empty
    assert list(lidc.table.columns) == ["sop_uid", "patient_id", "official_split"]


@pytest.mark.parametrize(
    ("name", "remove", "message"),
    [
        (
            "chestxray14",
            "Data_Entry_2017.csv",
            "no Data_Entry_2017.csv or Data_Entry_2017_v2020.csv",
        ),
        ("chestxray14", "test_list.txt", "test_list.txt: split list not found"),
        ("chestxray14", "images_001", None),
        ("chexpert", "CheXpert-v1.0-small/valid.csv", "valid.csv: file not found"),
        (
            "chexpert",
            "CheXpert-v1.0-small/train.csv",
            "no train.csv (here or in CheXpert-v1.0-small/",
        ),
        ("shenzhen", "ChinaSet_AllFiles/CXR_png", "no CXR_png (here or in ChinaSet_AllFiles/)"),
        ("drive", "DRIVE/test/mask", "no test/mask/"),
        ("siim", "train-rle.csv", "no train-rle.csv"),
        ("siim", "dicom-images-train", "no dicom-images-train"),
        ("rsna_pe", "train.csv", "no train.csv"),
        ("covid_ct", "Images-processed/CT_NonCOVID", "no CT_NonCOVID/"),
        ("covid_ct", "Data-split/NonCOVID/valCT_NonCOVID.txt", "no valCT_NonCOVID.txt"),
        ("organsmnist", "organsmnist.npz", "no organsmnist.npz"),
        ("lidc", "LIDC-IDRI", "no LIDC-IDRI-*/ patient folders"),
    ],
)
def test_missing_parts_are_named(
    tmp_path: Path, name: str, remove: str, message: str | None
) -> None:
    root = tmp_path / name
    replicas.WRITERS[name](root)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    if name == "chestxray14" and remove == "images_001":
        shutil.rmtree(root / "images_002")
        message = "no images_*/images/*.png or images/*.png"
    with pytest.raises(PresetError) as caught:
        look_up_preset(name).scan(root)
    assert str(caught.value).startswith(f"{name}: ") and message in str(caught.value)


def test_a_missing_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        PresetError, match=f"montgomery: {tmp_path / 'nope'}: root folder not found"
    ):
        look_up_preset("montgomery").scan(tmp_path / "nope")


def test_organsmnist_archive_without_an_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "organsmnist.npz", train_images=np.zeros((1, 28, 28)))
    with pytest.raises(PresetError, match=r"no array\(s\) \['train_labels'"):
        look_up_preset("organsmnist").scan(tmp_path)


# ----------------------------------------------------------------------- RLE


def reference_decode(encoded: str, height: int, width: int) -> np.ndarray:
    """SIIM's relative RLE decoded pixel by pixel, walking the image column by column."""
    mask = np.zeros((height, width), dtype=bool)
    if encoded.strip() == "-1":
        return mask
    values = [int(v) for v in encoded.split()]
    position = 0
    for offset, length in zip(values[0::2], values[1::2], strict=True):
        position += offset
        for pixel in range(position, position + length):
            mask[pixel % height, pixel // height] = True  # column-major: row varies fastest
        position += length
    return mask


def test_rle_matches_an_independent_decoder_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        height, width = int(rng.integers(3, 30)), int(rng.integers(3, 30))
        mask = rng.random((height, width)) < rng.uniform(0.05, 0.6)
        mask[-1, -1] = trial % 2 == 0  # runs that end at the last pixel, and not
        encoded = encode_rle(mask)
        np.testing.assert_array_equal(decode_rle(encoded, height, width), mask)
        np.testing.assert_array_equal(reference_decode(encoded, height, width), mask)
    assert encode_rle(np.zeros((4, 4), bool)) == "-1"
    assert not decode_rle("-1", 4, 4).any()


def test_rle_orientation_is_column_major() -> None:
    # "0 2": rows 0 and 1 of column 0; "1 1": skip pixel 2, then pixel 3 = row 0 of column 1
    mask = decode_rle("0 2 1 1", 3, 3)
    assert mask[:, 0].tolist() == [True, True, False] and mask[0, 1] and mask.sum() == 3


def test_rle_rows_of_one_image_are_a_union(tmp_path: Path) -> None:
    facts = replicas.siim(tmp_path)
    masks = rle_masks(tmp_path / "train-rle.csv", dict.fromkeys(facts["masks"], (64, 64)))
    two_rows = f"{replicas.UID_ROOT}.1.1"
    regions = replicas.pneumothorax_masks((64, 64), 1)
    assert len(regions) == 2 and not np.array_equal(regions[0] | regions[1], regions[0])
    np.testing.assert_array_equal(masks[two_rows], regions[0] | regions[1])
    for sop, mask in facts["masks"].items():
        np.testing.assert_array_equal(masks[sop], mask)
    assert not masks[f"{replicas.UID_ROOT}.1.0"].any()


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        ("3 4 5", "has 3 values; it needs (start, length) pairs"),
        ("10 5 2 4", "a run ends at pixel 21, past the end of the 4x4 image (16 pixels)"),
        ("1 x", "not a list of integers"),
        ("1 0", "non-positive length"),
    ],
)
def test_rle_errors_name_the_file_and_image(tmp_path: Path, encoded: str, message: str) -> None:
    path = tmp_path / "train-rle.csv"
    path.write_text(f"ImageId, EncodedPixels\n1.2.3, {encoded}\n")
    with pytest.raises(MaskError) as caught:
        rle_masks(path, {"1.2.3": (4, 4)})
    assert str(caught.value).startswith(f"{path}, ImageId 1.2.3: ") and message in str(caught.value)
