"""What every preset returns and the checks they share.

A preset knows one public release's folder tree, so the config names only its
root folder. :meth:`Preset.scan` reads the release's own label files and
returns a :class:`Manifest`: what the ``convert`` stage reads (``source``),
one row per image with its patient, official split and labels (``table``),
and what was found but cannot be used (``rejects``), so nothing is dropped
without a trace. Presets with masks also read them (:meth:`Preset.masks`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from PIL import Image

log = logging.getLogger(__name__)

Kind = Literal["images", "npz", "dicom"]
OFFICIAL_SPLITS = ("train", "val", "test", "")
IMAGE_COLUMNS = ("file", "patient_id", "study_id", "image_id", "official_split")
DICOM_COLUMNS = ("sop_uid", "patient_id", "official_split")


class PresetError(ValueError):
    """A release tree that does not match its preset; the message names the root and the file."""


@dataclass
class Manifest:
    """What a preset found under its root (see the module docstring).

    ``table`` columns: for ``images`` :data:`IMAGE_COLUMNS` then the labels
    (``file`` relative to ``source``); for ``dicom`` :data:`DICOM_COLUMNS`
    then the labels; for ``npz`` it may be empty (the archive holds its own
    split and labels). ``rejects``: ``(file, reason)`` pairs.
    """

    kind: Kind
    source: Path
    table: pd.DataFrame
    rejects: list[tuple[str, str]] = field(default_factory=list)
    label_columns: list[str] = field(default_factory=list)
    mask_structures: list[str] = field(default_factory=list)
    convert_settings: dict[str, Any] = field(default_factory=dict)
    """Conversion settings the release needs whatever the config says (RSNA-PE's
    anonymised PatientID: ``{"patient_key": "study_uid"}``)."""

    def __post_init__(self) -> None:
        required = {"images": IMAGE_COLUMNS, "dicom": DICOM_COLUMNS, "npz": ()}[self.kind]
        missing = [c for c in (*required, *self.label_columns) if c not in self.table.columns]
        if missing and not (self.kind == "npz" and self.table.empty):
            raise ValueError(f"{self.kind} manifest of {self.source} lacks columns {missing}")
        if "official_split" in self.table.columns:
            bad = sorted(set(self.table["official_split"]) - set(OFFICIAL_SPLITS))
            if bad:
                raise ValueError(
                    f"{self.source}: official_split values {bad} are not {OFFICIAL_SPLITS}"
                )
        key = "image_id" if self.kind == "images" else "sop_uid"
        if key in self.table.columns and self.table[key].duplicated().any():
            dupes = sorted(self.table.loc[self.table[key].duplicated(), key])[:3]
            raise ValueError(f"{self.source}: {key} is not unique (first: {dupes})")


class Preset:
    """One public release: its name, its masks' structures and how to scan it.

    Subclasses set :attr:`name`, :attr:`kind`, :attr:`structures` and
    :attr:`options` (the ``preset_options`` they accept, with defaults) and
    implement :meth:`_scan`; :meth:`scan` checks the root and the options
    first so every preset fails the same way.
    """

    name: ClassVar[str]
    kind: ClassVar[Kind]
    structures: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[Mapping[str, Any]] = {}

    def scan(self, root: str | Path, **options: Any) -> Manifest:
        """The manifest of the release under ``root``; ``options``: the config's preset_options."""
        root = Path(root)
        if not root.is_dir():
            raise PresetError(f"{self.name}: {root}: root folder not found")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "(none)"
            raise PresetError(f"{self.name}: unknown preset_options {unknown}; known: {known}")
        manifest = self._scan(root, {**self.options, **options})
        manifest.mask_structures = list(self.structures)
        log.info(
            "%s: %s: %d rows, %d rejects",
            self.name,
            root,
            len(manifest.table),
            len(manifest.rejects),
        )
        return manifest

    def _scan(self, root: Path, options: dict[str, Any]) -> Manifest:
        raise NotImplementedError

    def masks(
        self, root: str | Path, structure: str, sizes: Mapping[str, tuple[int, int]] | None = None
    ) -> dict[str, np.ndarray]:
        """Native-grid boolean masks of ``structure`` keyed by the manifest's ``file`` or SOP UID.

        ``sizes``: native (height, width) per SOP UID, for releases whose masks
        do not carry their size (run-length codes); image files carry theirs.
        """
        if structure not in self.structures:
            known = ", ".join(self.structures) or "(none)"
            raise PresetError(f"{self.name}: no masks of structure {structure!r}; has {known}")
        return self._masks(Path(root), structure, dict(sizes or {}))

    def _masks(
        self, root: Path, structure: str, sizes: dict[str, tuple[int, int]]
    ) -> dict[str, np.ndarray]:
        raise PresetError(f"{self.name}: the release has no masks")


# ------------------------------------------------------------------------- helpers


def find_one(root: Path, preset: str, candidates: Iterable[str], what: str = "") -> Path:
    """The first of ``candidates`` (relative to ``root``) that exists; else an error naming all."""
    candidates = list(candidates)
    for name in candidates:
        if (root / name).exists():
            return root / name
    names = " or ".join(candidates)
    raise PresetError(f"{preset}: {root}: no {names}" + (f" ({what})" if what else ""))


def find_release(root: Path, preset: str, markers: Iterable[str], folders: Iterable[str]) -> Path:
    """The release folder: ``root`` or one of ``folders`` in it, the first holding a marker.

    Users point at the folder they unpacked into as often as at the release
    folder inside it, so both are accepted.
    """
    markers = list(markers)
    for base in (root, *(root / f for f in folders)):
        if any((base / marker).exists() for marker in markers):
            return base
    inside = ", ".join(f"{f}/" for f in folders)
    raise PresetError(
        f"{preset}: {root}: no {' or '.join(markers)}"
        + (f" (here or in {inside})" if inside else "")
    )


def read_csv(path: Path, preset: str, columns: Iterable[str], **kwargs: Any) -> pd.DataFrame:
    """A release CSV with its header stripped of padding; missing columns name the file."""
    if not path.is_file():
        raise PresetError(f"{preset}: {path}: file not found")
    table = pd.read_csv(path, **kwargs)
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise PresetError(
            f"{preset}: {path}: no column(s) {missing}; columns are {list(table.columns)}"
        )
    return table


def read_list(path: Path, preset: str) -> list[str]:
    """The non-empty lines of a split list (one file name per line)."""
    if not path.is_file():
        raise PresetError(f"{preset}: {path}: split list not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def files_by_name(folder: Path, patterns: Iterable[str]) -> dict[str, Path]:
    """Files under ``folder`` matching ``patterns`` (recursive), keyed by file name."""
    found: dict[str, Path] = {}
    for pattern in patterns:
        for path in sorted(folder.rglob(pattern)):
            if path.is_file():
                found.setdefault(path.name, path)
    return found


def read_binary_image(path: Path) -> np.ndarray:
    """A mask image (GIF, PNG, TIFF) as booleans: any non-zero pixel is foreground."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 0


def join_rejects(
    listed: Iterable[str], present: Iterable[str], listed_in: str, folder: str
) -> tuple[set[str], list[tuple[str, str]]]:
    """Names listed and present, and rejects for each side without the other."""
    listed, present = set(listed), set(present)
    rejects = [
        (name, f"listed in {listed_in} but no image file") for name in sorted(listed - present)
    ]
    rejects += [
        (name, f"image in {folder} with no row in {listed_in}") for name in sorted(present - listed)
    ]
    return listed & present, rejects
