"""Miniature replicas of the public releases, in their published layouts.

Each writer builds one release's folder tree under ``root`` with the real
file names, CSV headers and quirks (pipe-separated findings, CheXpert's
``-1`` and blanks and its ``Path`` prefix, SIIM's leading space and multi-row
RLE, Montgomery's two mask folders, DRIVE's TIFF images and GIF masks), a few
patients and 32-64 px images, plus the faults the presets must report
(rows without images, images without rows, bad label values). Each returns
the release root and the facts the tests check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from medssl.datasets.presets.chestxray14 import FINDINGS
from medssl.datasets.presets.chexpert import OBSERVATIONS
from medssl.datasets.presets.rle import encode_rle
from medssl.datasets.presets.rsna_pe import LABELS as PE_LABELS

UID_ROOT = "1.2.826.0.1.3680043.10.1234"


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _gray(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_dicom(path: Path, pixels: np.ndarray, tags: dict[str, str], z: float = 0.0) -> None:
    """A small secondary-capture DICOM (MONOCHROME2, 8 bit) with the given UIDs and PatientID.

    Radiographs carry a PixelSpacing, as SIIM's do; CT slices (``Modality`` CT)
    also their plane (at ``z`` mm) and a rescale to HU, as RSNA-PE's and LIDC's do.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = tags["SOPInstanceUID"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = tags.get("Modality", "CR")
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelSpacing = ["0.168", "0.168"]
    if ds.Modality == "CT":
        ds.ImagePositionPatient = ["0", "0", f"{z:g}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceThickness = "1"
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# ------------------------------------------------------------------ ChestX-ray14

CXR14_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)


def chestxray14(root: Path, n_patients: int = 10, conflict: bool = False) -> dict:
    """Two images per patient in ``images_001/images`` and ``images_002/images``.

    Patients 1-7 are on ``train_val_list.txt``, 8-10 on ``test_list.txt``;
    ``conflict`` also lists patient 7's second image as test. Faults: a row
    whose image is missing (``00000099_000.png``), an image with no row
    (``00000098_000.png``), a row with an unknown finding (``00000097_000.png``).
    The first image is a 16-bit PNG.
    """
    rng = np.random.default_rng(14)
    lines, train, test, labels = [CXR14_HEADER], [], [], {}
    for patient in range(1, n_patients + 1):
        for follow_up in range(2):
            name = f"{patient:08d}_{follow_up:03d}.png"
            findings = [f for i, f in enumerate(FINDINGS) if (patient + follow_up + i) % 5 == 0]
            text = "|".join(findings) if findings else "No Finding"
            labels[name] = set(findings)
            lines.append(
                f"{name},{text},{follow_up},{patient},{40 + patient},M,PA,32,32,0.143,0.143,"
            )
            folder = "images_001" if patient <= n_patients // 2 else "images_002"
            pixels = _gray(rng, (32, 32))
            if patient == 1 and follow_up == 0:
                pixels = pixels.astype(np.uint16) * 257  # a 16-bit PNG
            _png(root / folder / "images" / name, pixels)
            on_test = patient > 7 or (conflict and patient == 7 and follow_up == 1)
            (test if on_test else train).append(name)
    lines.append("00000099_000.png,Mass,0,99,50,F,AP,32,32,0.143,0.143,")
    lines.append("00000097_000.png,Covid|Mass,0,97,50,F,AP,32,32,0.143,0.143,")
    _png(root / "images_001" / "images" / "00000097_000.png", _gray(rng, (32, 32)))
    _png(root / "images_002" / "images" / "00000098_000.png", _gray(rng, (32, 32)))
    train += ["00000099_000.png", "00000097_000.png"]
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return {"root": root, "labels": labels, "train": train[:-2], "test": test}


# ---------------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]


def chexpert(root: Path, folder: str = "CheXpert-v1.0-small") -> dict:
    """9 training patients (one with a lateral view), 3 validation patients.

    Observation values cycle through 1.0, 0.0, -1.0 and blank in train; valid
    has no -1, as released. Faults: a train row with value 2.0
    (``patient00009``), a train row without its image (``patient00010``).
    The first image is an RGB JPEG.
    """
    rng = np.random.default_rng(5)
    release = root / folder
    cycle = ["1.0", "0.0", "-1.0", ""]
    rows = {"train": [], "valid": []}
    patients = {"train": range(1, 11), "valid": range(64541, 64544)}
    for split, ids in patients.items():
        for k, patient in enumerate(ids):
            views = ["view1_frontal"] + (["view2_lateral"] if k == 0 else [])
            for view in views:
                rel = f"{split}/patient{patient:05d}/study1/{view}.jpg"
                values = [cycle[(k + j) % 4] for j in range(len(OBSERVATIONS))]
                if split == "valid":
                    values = [v if v != "-1.0" else "1.0" for v in values]
                if split == "train" and patient == 9:
                    values[2] = "2.0"
                side = "Lateral" if "lateral" in view else "Frontal"
                rows[split].append([f"{folder}/{rel}", "Male", "60", side, "AP", *values])
                if patient == 10:
                    continue  # listed, but the image is missing
                pixels = _gray(rng, (48, 40))
                if not rows["valid"] and k == 0 and view == "view1_frontal":
                    pixels = np.stack([pixels, pixels // 2, 255 - pixels], axis=-1)  # RGB
                (release / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(release / rel, quality=90)
    for split, name in (("train", "train.csv"), ("valid", "valid.csv")):
        lines = [",".join(CHEXPERT_HEADER)] + [",".join(r) for r in rows[split]]
        (release / name).write_text("\n".join(lines) + "\n")
    return {"root": root, "release": release, "rows": rows}


# ------------------------------------------------------------ Shenzhen, Montgomery


def shenzhen(root: Path, n: int = 10) -> dict:
    """``ChinaSet_AllFiles/CXR_png``: n images, every third tuberculous, plus Thumbs.db
    and one wrongly named file (``CHNCXR_0099.png``)."""
    rng = np.random.default_rng(1)
    folder = root / "ChinaSet_AllFiles" / "CXR_png"
    labels = {}
    for i in range(1, n + 1):
        name = f"CHNCXR_{i:04d}_{int(i % 3 == 0)}.png"
        labels[name] = int(i % 3 == 0)
        _png(folder / name, _gray(rng, (40, 36)))
    _png(folder / "CHNCXR_0099.png", _gray(rng, (40, 36)))
    (folder / "Thumbs.db").write_bytes(b"\0" * 16)
    return {"root": root, "labels": labels}


def lung_masks(shape: tuple[int, int], index: int) -> tuple[np.ndarray, np.ndarray]:
    """Left and right lung boxes of one Montgomery image (0/255, as released)."""
    left, right = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    top = 4 + index % 4
    left[top : shape[0] - 6, 3 : shape[1] // 2 - 2] = 255
    right[top + 1 : shape[0] - 5, shape[1] // 2 + 2 : shape[1] - 3] = 255
    return left, right


def montgomery(root: Path, n: int = 10) -> dict:
    """``MontgomerySet/CXR_png`` and ``ManualMask/{left,right}Mask`` (48x40 images)."""
    rng = np.random.default_rng(2)
    release = root / "MontgomerySet"
    labels, lungs = {}, {}
    for i in range(1, n + 1):
        name = f"MCUCXR_{i:04d}_{int(i % 2 == 0)}.png"
        labels[name] = int(i % 2 == 0)
        _png(release / "CXR_png" / name, _gray(rng, (48, 40)))
        left, right = lung_masks((48, 40), i)
        _png(release / "ManualMask" / "leftMask" / name, left)
        _png(release / "ManualMask" / "rightMask" / name, right)
        lungs[f"CXR_png/{name}"] = (left > 0) | (right > 0)
    return {"root": root, "release": release, "labels": labels, "lungs": lungs}


# ------------------------------------------------------------------------- DRIVE


def drive(root: Path, test_manual: bool = False) -> dict:
    """``DRIVE/training`` (21-26) and ``DRIVE/test`` (01-04): RGB TIFFs, GIF masks (36x34).

    ``test_manual``: also ``test/1st_manual`` (the original release has it).
    Fault: ``27_training.tif`` has no ``1st_manual`` GIF.
    """
    rng = np.random.default_rng(3)
    release = root / "DRIVE"
    vessels, fovs = {}, {}
    parts = (("training", range(21, 27)), ("test", range(1, 5)))
    for part, numbers in parts:
        for number in numbers:
            n = f"{number:02d}"
            image = release / part / "images" / f"{n}_{part}.tif"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (36, 34, 3), dtype=np.uint8)).save(image)
            fov = np.zeros((36, 34), np.uint8)
            fov[2:-2, 2:-2] = 255
            vessel = (rng.random((36, 34)) < 0.2).astype(np.uint8) * 255
            _png_gif(release / part / "mask" / f"{n}_{part}_mask.gif", fov)
            key = image.relative_to(release).as_posix()
            fovs[key] = fov > 0
            if part == "training" or test_manual:
                _png_gif(release / part / "1st_manual" / f"{n}_manual1.gif", vessel)
                vessels[key] = vessel > 0
    orphan = release / "training" / "images" / "27_training.tif"
    Image.fromarray(rng.integers(0, 256, (36, 34, 3), dtype=np.uint8)).save(orphan)
    _png_gif(release / "training" / "mask" / "27_training_mask.gif", np.zeros((36, 34), np.uint8))
    fovs["training/images/27_training.tif"] = np.zeros((36, 34), bool)
    return {"root": root, "release": release, "vessel": vessels, "fov": fovs}


def _png_gif(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="GIF")


# ------------------------------------------------------------------------- SIIM


def pneumothorax_masks(shape: tuple[int, int], index: int) -> list[np.ndarray]:
    """The regions of one image: none for even ``index``, two overlapping boxes for index 1."""
    if index % 2 == 0:
        return []
    first = np.zeros(shape, bool)
    first[5 + index : 20 + index, 8:30] = True
    if index != 1:
        return [first]
    second = np.zeros(shape, bool)
    second[15:40, 20:44] = True
    return [first, second]


def siim(root: Path, n: int = 10, size: int = 64) -> dict:
    """``dicom-images-train/<study>/<series>/<sop>.dcm`` and ``train-rle.csv``.

    Odd images have pneumothorax (image 1 in two rows), even ones a ``-1``
    row. Faults: a row whose DICOM is missing, a DICOM with no row.
    """
    rng = np.random.default_rng(4)
    lines = ["ImageId, EncodedPixels"]
    masks, labels = {}, {}
    for i in range(n + 1):
        sop = f"{UID_ROOT}.1.{i}"
        tags = {
            "SOPInstanceUID": sop,
            "StudyInstanceUID": f"{UID_ROOT}.2.{i}",
            "SeriesInstanceUID": f"{UID_ROOT}.3.{i}",
            "PatientID": f"pid-{i:03d}",
        }
        folder = root / "dicom-images-train" / tags["StudyInstanceUID"] / tags["SeriesInstanceUID"]
        write_dicom(folder / f"{sop}.dcm", _gray(rng, (size, size)), tags)
        if i == n:
            break  # the last DICOM has no row
        regions = pneumothorax_masks((size, size), i)
        for region in regions:
            lines.append(f"{sop}, {encode_rle(region)}")
        if not regions:
            lines.append(f"{sop}, -1")
        masks[sop] = np.logical_or.reduce(regions) if regions else np.zeros((size, size), bool)
        labels[sop] = int(bool(regions))
    lines.append(f"{UID_ROOT}.1.999, -1")
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    return {"root": root, "masks": masks, "labels": labels, "missing": f"{UID_ROOT}.1.999"}


# ---------------------------------------------------------------------- RSNA PE


def rsna_pe(root: Path, n_studies: int = 9, slices: int = 2) -> dict:
    """``train/<study>/<series>/<sop>.dcm`` and ``train.csv`` keyed by SOPInstanceUID.

    Faults: a row without its DICOM, and one with ``pe_present_on_image`` = 2.
    """
    rng = np.random.default_rng(6)
    rows = []
    for s in range(n_studies):
        study, series = f"{UID_ROOT}.5.{s}", f"{UID_ROOT}.6.{s}"
        for k in range(slices):
            sop = f"{UID_ROOT}.7.{s}.{k}"
            tags = {"SOPInstanceUID": sop, "StudyInstanceUID": study, "SeriesInstanceUID": series}
            tags |= {"PatientID": "anon", "Modality": "CT"}
            write_dicom(
                root / "train" / study / series / f"{sop}.dcm", _gray(rng, (32, 32)), tags, k
            )
            values = {c: int((s + k + j) % 3 == 0) for j, c in enumerate(PE_LABELS)}
            rows.append(
                {
                    "StudyInstanceUID": study,
                    "SeriesInstanceUID": series,
                    "SOPInstanceUID": sop,
                    **values,
                }
            )
    missing = {**rows[0], "SOPInstanceUID": f"{UID_ROOT}.7.99.0"}
    bad = {**rows[1], "SOPInstanceUID": rows[1]["SOPInstanceUID"]}
    rows[1] = {**bad, "pe_present_on_image": 2}
    pd.DataFrame([*rows, missing]).to_csv(root / "train.csv", index=False)
    return {
        "root": root,
        "rows": rows,
        "bad": rows[1]["SOPInstanceUID"],
        "missing": missing["SOPInstanceUID"],
    }


# --------------------------------------------------------------------- COVID-CT


def covid_ct(root: Path) -> dict:
    """``Images-processed/CT_COVID`` (PNG) and ``CT_NonCOVID`` (JPEG), ``Data-split`` lists.

    Names follow the release: COVID images from papers, with ``%k`` panels of
    one figure; ``NonCOVID`` numbers with ``%k`` panels. Fault: a list entry
    without its image.
    """
    rng = np.random.default_rng(7)
    names = {
        "CT_COVID": [f"2020.02.{10 + i}.2002{i}-p{i}-{20 + i}.png" for i in range(5)]
        + ["2020.03.01.1234-p3-7%0.png", "2020.03.01.1234-p3-7%1.png"],
        "CT_NonCOVID": [f"{i}.jpg" for i in range(5)] + ["7%0.jpg", "7%1.jpg", "8.png"],
    }
    split_of = {}
    for folder, files in names.items():
        short = folder.removeprefix("CT_")
        lists = {"train": [], "val": [], "test": []}
        for i, name in enumerate(files):
            split = ("train", "train", "val", "test")[i % 4] if "%" not in name else "train"
            lists[split].append(name)
            split_of[f"{folder}/{name}"] = split
            path = root / "Images-processed" / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_gray(rng, (40, 40))).save(path)
        lists["test"].append(f"missing_{short}.png")
        for split, entries in lists.items():
            target = root / "Data-split" / short / f"{split}{folder}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join(entries) + "\n")
    return {"root": root, "split_of": split_of}


# ----------------------------------------------------------- OrganSMNIST, LIDC


def organsmnist(root: Path) -> dict:
    """``organsmnist.npz`` with MedMNIST's six arrays (28x28, labels 0..10)."""
    rng = np.random.default_rng(8)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 11, (n, 1))
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "organsmnist.npz", **arrays)
    return {"root": root, "arrays": arrays}


def lidc(root: Path, n_patients: int = 3) -> dict:
    """``LIDC-IDRI/LIDC-IDRI-000k/<study>/<series>/1-00j.dcm`` (two slices each)."""
    rng = np.random.default_rng(9)
    for p in range(1, n_patients + 1):
        for j in range(2):
            tags = {
                "SOPInstanceUID": f"{UID_ROOT}.8.{p}.{j}",
                "StudyInstanceUID": f"{UID_ROOT}.9.{p}",
                "SeriesInstanceUID": f"{UID_ROOT}.10.{p}",
                "PatientID": f"LIDC-IDRI-{p:04d}",
                "Modality": "CT",
            }
            folder = root / "LIDC-IDRI" / f"LIDC-IDRI-{p:04d}" / f"01-01-2000-{p}" / f"3000-{p}"
            write_dicom(folder / f"1-{j + 1:03d}.dcm", _gray(rng, (32, 32)), tags, j)
    return {"root": root, "patients": [f"LIDC-IDRI-{p:04d}" for p in range(1, n_patients + 1)]}


WRITERS = {
    "chestxray14": chestxray14,
    "chexpert": chexpert,
    "shenzhen": shenzhen,
    "montgomery": montgomery,
    "drive": drive,
    "siim": siim,
    "rsna_pe": rsna_pe,
    "covid_ct": covid_ct,
    "organsmnist": organsmnist,
    "lidc": lidc,
}
"""Per preset: the writer of its replica (every preset has one; a test checks it)."""
