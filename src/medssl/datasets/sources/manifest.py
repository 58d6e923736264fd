"""The manifest of an image-file dataset, its checks, and the labels table.

A manifest is a table with one row per image: ``file`` (path relative to the
root folder), ``patient_id``, optional ``study_id``, optional ``image_id``
(default: ``file`` without its suffix), optional ``official_split``, and any
label columns. Public image datasets ship their labels in such a CSV
(ChestX-ray14, CheXpert), so the manifest is both the list of files and the
source of the labels table that the split stage joins on ``sop_uid``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from medssl.core.files import write_csv
from medssl.dicom.reading import Rejection

log = logging.getLogger(__name__)

REQUIRED = ("file", "patient_id")
#: Columns with a meaning of their own; every other column is a label.
RESERVED = ("file", "patient_id", "study_id", "image_id", "official_split")
#: The file suffixes a folder scan counts as images (what Pillow decodes here).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")
#: The columns of the labels table before the label columns.
LABEL_KEYS = ("sop_uid", "patient_id", "official_split")


class ManifestError(ValueError):
    """A manifest that cannot be used at all (missing column, unreadable CSV)."""


@dataclass(frozen=True)
class ImageTask:
    """One manifest row that points at an existing file: what a worker decodes."""

    path: Path
    file: str  # relative to the root: /meta/source_file
    image_id: str
    patient_id: str
    study_id: str

    @property
    def sort_key(self) -> tuple[str, str, str]:
        return (self.patient_id, self.study_id, self.image_id)


def load_manifest(manifest: pd.DataFrame | str | os.PathLike[str]) -> pd.DataFrame:
    """The manifest as a table of strings, with its required columns checked.

    Read as text so that ids such as ``00012`` keep their zeros; label columns
    are cast back to numbers where every value is one (see :func:`labels_table`).
    """
    if isinstance(manifest, pd.DataFrame):
        table, name = manifest.copy(), "manifest table"
    else:
        name = str(manifest)
        try:
            table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise ManifestError(f"{name}: cannot read the manifest CSV ({err})") from err
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise ManifestError(
            f"{name}: manifest lacks column(s) {', '.join(missing)} "
            f"(has {', '.join(map(str, table.columns)) or 'none'})"
        )
    table = table.fillna("").astype(str)
    table["file"] = table["file"].str.strip()
    if "image_id" not in table.columns or (table["image_id"] == "").any():
        default = table["file"].map(lambda f: str(PurePosixPath(f).with_suffix("")))
        if "image_id" in table.columns:
            default = table["image_id"].where(table["image_id"] != "", default)
        table["image_id"] = default
    if "study_id" not in table.columns:
        table["study_id"] = ""
    table["study_id"] = table["study_id"].where(table["study_id"] != "", table["image_id"])
    if "official_split" not in table.columns:
        table["official_split"] = ""
    return table.reset_index(drop=True)


def label_columns(table: pd.DataFrame) -> list[str]:
    """The manifest's label columns: every column without a reserved meaning."""
    return [c for c in table.columns if c not in RESERVED]


def check_rows(table: pd.DataFrame, root: Path) -> tuple[list[ImageTask], list[Rejection]]:
    """Rows that point at an existing file with a unique image_id and a patient id;
    each other row is a reject with its reason."""
    tasks: list[ImageTask] = []
    rejected: list[Rejection] = []
    counts = table["image_id"].value_counts()
    for row in table.itertuples(index=False):
        file, image_id = str(row.file), str(row.image_id)
        reason = None
        if counts[image_id] > 1:
            reason = f"duplicated image_id {image_id!r} ({counts[image_id]} manifest rows)"
        elif not file:
            reason = "manifest row has an empty file"
        elif not str(row.patient_id).strip():
            reason = "manifest row has no patient_id"
        elif not (root / file).is_file():
            reason = "file listed in the manifest does not exist"
        if reason is not None:
            rejected.append(Rejection(file, str(row.study_id), reason))
            continue
        tasks.append(ImageTask(root / file, file, image_id, str(row.patient_id), str(row.study_id)))
    return sorted(tasks, key=lambda t: t.sort_key), rejected


def scan_folder(root: Path, listed: Iterable[str]) -> tuple[int, list[Rejection]]:
    """Files under ``root`` and a reject for each image file that no manifest row lists.

    Only asked for (``--scan-folder``): a folder often holds images a dataset's
    CSV leaves out on purpose, so unlisted files are not looked for by default.
    Returns the number of files found (every file, images or not) and the rejects.
    """
    known = {PurePosixPath(f).as_posix() for f in listed}
    n_files = 0
    rejected: list[Rejection] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        if rel in known:
            continue
        n_files += 1
        if path.suffix.lower() in IMAGE_SUFFIXES:
            reason = "file in the folder has no manifest row (folder scan)"
            rejected.append(Rejection(rel, "", reason))
    return n_files, rejected


def labels_table(table: pd.DataFrame, converted: Sequence[str]) -> pd.DataFrame:
    """One row per converted image (in ``converted`` order), keyed by ``sop_uid``
    (= image_id), with ``patient_id``, ``official_split`` and every label column."""
    labels = label_columns(table)
    rows = table.drop_duplicates("image_id", keep=False).set_index("image_id")
    frame = rows.loc[list(converted), ["patient_id", "official_split", *labels]]
    frame = frame.rename_axis("sop_uid").reset_index()
    for column in labels:
        numeric = pd.to_numeric(frame[column], errors="coerce")
        if numeric.notna().all():
            frame[column] = numeric
    return frame


def write_labels(path: str | os.PathLike[str], frame: pd.DataFrame) -> None:
    """The labels table CSV (atomic, like every stage output)."""
    write_csv(path, frame)
    log.info("labels table: %d rows, columns %s -> %s", len(frame), list(frame.columns), path)
