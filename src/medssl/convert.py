"""Stage ``convert``: a DICOM folder, image files, an npz archive or NIfTI volumes ->
one HDF5 dataset, its rejects CSV and (images, npz, presets) its labels table.

``python -m medssl.convert SRC_DIR OUT.h5`` (standalone: CT, raw HU, native size),
``python -m medssl.convert --dicom-dir DIR --out H5 --rejects CSV --settings JSON --threads N``
(the workflow), ``python -m medssl.convert --source images --root DIR --manifest CSV OUT.h5
--labels-out CSV``, ``--source npz --root ARCHIVE.npz``, ``--source nifti --root DIR``, or
``--preset NAME --root DIR``. ``--help`` lists every option and the HDF5 layout; the work is
:func:`medssl.datasets.conversion.convert` and :mod:`medssl.datasets.sources`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

from medssl.cli import json_object, stage_main
from medssl.datasets.conversion import COMPRESSION, INTENSITY_POLICIES, STANDALONE_DEFAULTS, convert
from medssl.datasets.conversion.intensity import HU_DTYPES
from medssl.datasets.conversion.settings import RGB_POLICIES, SOURCES
from medssl.datasets.resizing import FITS, GEOMETRIES
from medssl.dicom.geometry import (
    DEFAULT_GAP_TOLERANCE,
    GAP_POLICIES,
    TILT_POLICIES,
    TILT_TOLERANCE_DEG,
)

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Convert a folder of DICOM files (any nesting, any names), image files listed by a "
    "manifest, a MedMNIST npz archive or NIfTI volumes into one HDF5 dataset. Defaults: "
    "DICOM, CT only, raw HU as int16, native size (mixed matrix sizes padded), gaps split; "
    "image files and npz keep their 8- or 16-bit values (policy scale). Writes "
    "OUT.rejects.csv beside OUT.h5 unless --rejects is given."
)

#: Standalone defaults of the sources that hold stored pixels, not HU.
PIXEL_STANDALONE_DEFAULTS: dict[str, Any] = {"intensity": {"policy": "scale"}, "image_size": None}

LAYOUT_HELP = """\
HDF5 layout (one file per dataset):
  /images              (N, C, H, W), one chunk per slice, Blosc (LZ4) via
                       hdf5plugin (import hdf5plugin to read), or LZF/none;
                       int16 HU (policy hu, default), float16 HU, or uint8
                       (window / minmax). Attributes: policy, scale, offset
                       (model input = stored * scale + offset), channels (JSON),
                       compression.
  /meta/patient_id     (N,) UTF-8, DICOM PatientID (or its keyed hash)
  /meta/study_uid      (N,) UTF-8, StudyInstanceUID
  /meta/series_uid     (N,) UTF-8, SeriesInstanceUID (+ "#k" for parts split at gaps)
  /meta/sop_uid        (N,) UTF-8, SOPInstanceUID
  /meta/source_file    (N,) UTF-8, path relative to SRC_DIR
  /meta/slice_index    (N,) int32, position in the sorted series
  /meta/z              (N,) float64, mm along the slice normal
  /meta/spacing        (N, 3) float32, mm: row, column, slice (NaN: images, npz)
  /meta/original_shape (N, 2) int32, native rows, columns
  /meta/resized_shape  (N, 2) int32, rows, columns after resampling
  /meta/pad_offset     (N, 2) int32, top-left on the stored grid (<0: cropped)
  /meta/scale          (N, 2) float32, stored pixels per native pixel
  root attributes      provenance (JSON: version, settings), source,
                       n_files_seen, n_images_seen, n_converted, n_rejected,
                       n_series, reject_reasons (JSON), series_findings (JSON:
                       gaps, gantry tilt), volume_orientation (NIfTI, JSON)
Rows are ordered by patient, study, series, position. Every image found is
converted or listed in the rejects CSV (file, series_uid, reason).

Sources (--source): dicom (default); images: files listed by --manifest CSV
(columns file, patient_id, optional study_id, image_id, official_split, and
label columns; PNG/JPEG/TIFF/GIF/BMP via Pillow); npz: a MedMNIST archive
(each image its own patient); nifti: .nii/.nii.gz volumes in HU, axial
slices. --labels-out writes one row per converted image: sop_uid,
patient_id, official_split and the label columns.
"""

#: Options that override one settings key each, under the key of the same name.
SINGLE_KEYS = (
    "modalities",
    "gap_policy",
    "gap_tolerance",
    "tilt_policy",
    "max_reject_fraction",
    "compression",
    "pseudonym_key_env",
    "geometry",
    "fit",
    "rgb",
    "warn_reject_fraction",
    "target_spacing",
)


def _window(text: str) -> tuple[float, float]:
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"window must be CENTER,WIDTH, got {text!r}") from err
    return center, width


def _spacing(text: str) -> list[float]:
    try:
        row, col = (float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"spacing must be ROW,COL in mm, got {text!r}") from err
    return [row, col]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The stage's options in the groups ``--help`` shows them in."""
    add_input_arguments(parser)
    parser.add_argument(
        "--settings",
        type=json_object,
        default=None,
        help="JSON object of the data.convert config section; replaces the standalone "
        "defaults, the options below then override single keys",
    )
    add_intensity_arguments(parser)
    add_series_arguments(parser)
    add_geometry_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="worker processes (default 1)")


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """What to read (source, folder, manifest, preset) and what to write."""
    parser.add_argument(
        "src", nargs="?", type=Path, help="DICOM folder, image folder, npz or NIfTI (SRC)"
    )
    parser.add_argument("out_h5", nargs="?", type=Path, help="HDF5 file to write (OUT.h5)")
    parser.add_argument(
        "--source", choices=SOURCES, default="dicom", help="what SRC holds (default dicom)"
    )
    parser.add_argument(
        "--root", type=Path, help="same as SRC; then the one positional argument is OUT.h5"
    )
    parser.add_argument("--dicom-dir", type=Path, help="same as SRC for --source dicom")
    parser.add_argument(
        "--manifest",
        type=Path,
        help="manifest CSV (images; optional for nifti: file -> patient_id)",
    )
    parser.add_argument(
        "--scan-folder",
        action="store_true",
        help="images: also reject image files under the root that the manifest does not list",
    )
    parser.add_argument(
        "--preset", help="dataset preset: its scan of --root gives the manifest and the source"
    )
    parser.add_argument(
        "--preset-options",
        type=json_object,
        default=None,
        help="JSON object of the preset's options (data.datasets.<d>.preset_options)",
    )
    parser.add_argument("--labels-out", type=Path, help="labels table CSV (images, npz, presets)")
    parser.add_argument("--out", type=Path, help="same as OUT.h5")
    parser.add_argument("--rejects", type=Path, help="rejects CSV (default OUT.rejects.csv)")


def add_intensity_arguments(parser: argparse.ArgumentParser) -> None:
    """Modalities, intensity policy, HU windows and dtype, output size."""
    parser.add_argument("--modalities", nargs="+", help="modalities to keep (default CT)")
    parser.add_argument(
        "--policy", choices=INTENSITY_POLICIES.names(), help="intensity policy (default hu)"
    )
    parser.add_argument(
        "--window",
        type=_window,
        action="append",
        metavar="CENTER,WIDTH",
        help="HU window for policy window, one channel each; repeatable",
    )
    parser.add_argument("--dtype", choices=list(HU_DTYPES), help="HU dtype (default int16)")
    parser.add_argument("--image-size", help="output size in pixels, or 'native' (default native)")


def add_series_arguments(parser: argparse.ArgumentParser) -> None:
    """Series-level policies: gaps, gantry tilt, rejects, pseudonyms."""
    parser.add_argument(
        "--gap-policy",
        choices=GAP_POLICIES.names(),
        help="series whose slice steps deviate from the median: split into parts "
        "(default), reject the series, or keep and only report",
    )
    parser.add_argument(
        "--gap-tolerance",
        type=float,
        help=f"relative deviation from the median step that is a gap "
        f"(default {DEFAULT_GAP_TOLERANCE})",
    )
    parser.add_argument(
        "--tilt-policy",
        choices=list(TILT_POLICIES),
        help=f"series with gantry tilt (stacked more than {TILT_TOLERANCE_DEG} deg off the "
        "slice normal): convert and report (default), or reject",
    )
    parser.add_argument(
        "--max-reject-fraction",
        type=float,
        help="fail (no HDF5 written) when more than this fraction of files is rejected",
    )
    parser.add_argument(
        "--pseudonym-key-env",
        metavar="VAR",
        help="store HMAC-SHA256 pseudonyms of PatientID keyed by this environment variable",
    )


def add_geometry_arguments(parser: argparse.ArgumentParser) -> None:
    """Storage and geometry: compression, mixed shapes, fit, colour, spacing, warnings."""
    parser.add_argument(
        "--compression", choices=COMPRESSION.names(), help="HDF5 filter (default blosc)"
    )
    parser.add_argument(
        "--geometry",
        choices=GEOMETRIES,
        help="native size, mixed shapes: pad to the largest (default), crop to the smallest, "
        "resize to the largest, or reject all but the most common shape",
    )
    parser.add_argument(
        "--fit", choices=FITS, help="with --image-size: pad the short side or crop the long one"
    )
    parser.add_argument("--rgb", choices=RGB_POLICIES, help="colour images: grey or keep")
    parser.add_argument(
        "--target-spacing", type=_spacing, metavar="ROW,COL", help="resample to this spacing (mm)"
    )
    parser.add_argument(
        "--warn-reject-fraction",
        type=float,
        help="log a WARNING when more than this fraction of images is rejected (default 0.05)",
    )


def settings_from(args: argparse.Namespace, source: str = "dicom") -> dict[str, Any]:
    """Settings from --settings (or the source's standalone defaults), then the single options."""
    standalone = PIXEL_STANDALONE_DEFAULTS if source in ("images", "npz") else STANDALONE_DEFAULTS
    settings = copy.deepcopy(standalone if args.settings is None else args.settings)
    intensity = settings.setdefault("intensity", {})
    if args.policy is not None:
        intensity.clear()
        intensity["policy"] = args.policy
    if args.window:
        intensity["windows"] = [{"center": c, "width": w} for c, w in args.window]
    if args.dtype is not None:
        intensity["dtype"] = args.dtype
    for name in SINGLE_KEYS:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if args.image_size is not None:
        settings["image_size"] = None if args.image_size == "native" else int(args.image_size)
    return settings


def _paths(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """(SRC, OUT.h5): with --root or --dicom-dir the one positional argument is OUT.h5."""
    root = args.root or args.dicom_dir
    if root is not None:
        return root, args.out or args.src
    return args.src, args.out or args.out_h5


def run(args: argparse.Namespace) -> None:
    src, out = _paths(args)
    if src is None or out is None:
        raise ValueError("give SRC_DIR and OUT.h5 (or --dicom-dir and --out)")
    rejects = args.rejects or out.with_name(out.stem + ".rejects.csv")
    if args.preset is not None:
        run_preset(args, src, out, rejects)
        return
    convert_source(args.source, src, out, rejects, args)


def convert_source(
    source: str,
    src: Path | Any,
    out: Path,
    rejects: Path,
    args: argparse.Namespace,
    manifest: Any = None,
    extra_rejects: list[Any] | None = None,
) -> dict[str, Any]:
    """One conversion by ``source`` of ``src`` (a folder or an archive); ``manifest``
    (a table, for a preset) replaces ``--manifest``; ``extra_rejects`` join the rejects."""
    settings = settings_from(args, source)
    if source == "dicom":
        summary = convert(src, out, rejects, settings, threads=args.threads)
        if args.labels_out is not None and manifest is None:
            write_keys_table(out, args.labels_out)
        return summary
    # Imported here: the DICOM path (the workflow's) does not need them.
    from medssl.datasets.sources import convert_images, convert_nifti, convert_npz

    if source == "images":
        manifest = args.manifest if manifest is None else manifest
        if manifest is None:
            raise ValueError("--source images needs --manifest CSV")
        return convert_images(
            src,
            manifest,
            out,
            rejects,
            settings,
            threads=args.threads,
            labels_out=args.labels_out,
            scan=args.scan_folder,
            extra_rejects=extra_rejects,
        )
    if source == "npz":
        return convert_npz(
            src, out, rejects, settings, labels_out=args.labels_out, extra_rejects=extra_rejects
        )
    summary = convert_nifti(
        src, out, rejects, settings, threads=args.threads, manifest=args.manifest
    )
    if args.labels_out is not None:
        write_keys_table(out, args.labels_out)
    return summary


def write_keys_table(out: Path, labels_out: Path) -> None:
    """The labels table of a source without labels of its own (a DICOM or NIfTI folder):
    each converted image's keys, so every dataset has the same table beside its HDF5
    file; the user's label CSV holds the labels."""
    from medssl.core.files import write_csv
    from medssl.datasets.hdf5 import read_meta

    meta = read_meta(out)
    keys = meta[["sop_uid", "patient_id"]].drop_duplicates("sop_uid").assign(official_split="")
    write_csv(labels_out, keys)
    log.info("labels table: %d images, keys only -> %s", len(keys), labels_out)


def run_preset(args: argparse.Namespace, root: Path, out: Path, rejects: Path) -> None:
    """``--preset NAME --root DIR``: the preset's scan gives the manifest and the source."""
    # Imported here, so that convert works without (and before) the presets package.
    from medssl.datasets.presets import look_up_preset
    from medssl.dicom.reading import Rejection

    manifest = look_up_preset(args.preset).scan(Path(root), **(args.preset_options or {}))
    needs = getattr(manifest, "convert_settings", None) or {}
    if needs:
        log.info("preset %s: conversion settings %s", args.preset, manifest.convert_settings)
        base = STANDALONE_DEFAULTS if args.settings is None else args.settings
        args.settings = {**copy.deepcopy(base), **manifest.convert_settings}
    preset_rejects = [Rejection(str(f), "", str(reason)) for f, reason in manifest.rejects]
    if preset_rejects:
        log.info("preset %s: %d rows could not be matched", args.preset, len(preset_rejects))
    if manifest.kind == "images":
        convert_source(
            "images", manifest.source, out, rejects, args, manifest.table, preset_rejects
        )
    elif manifest.kind == "npz":
        convert_source("npz", manifest.source, out, rejects, args, None, preset_rejects)
    elif manifest.kind == "dicom":
        convert_source("dicom", manifest.source, out, rejects, args, manifest.table)
        _finish_dicom_preset(manifest.table, out, rejects, args.labels_out, preset_rejects)
    else:
        raise ValueError(f"preset {args.preset}: unknown manifest kind {manifest.kind!r}")


def _finish_dicom_preset(
    table: Any, out: Path, rejects: Path, labels_out: Path | None, preset_rejects: list[Any]
) -> None:
    """The labels table of a DICOM preset restricted to the converted SOP UIDs, and the
    preset's unmatched rows appended to the rejects CSV."""
    import pandas as pd

    from medssl.core.files import write_csv
    from medssl.datasets.conversion.layout import REJECT_COLUMNS
    from medssl.datasets.sources.common import converted_ids

    if preset_rejects:
        extra = pd.DataFrame([(r.file, r.series_uid, r.reason) for r in preset_rejects])
        extra.columns = list(REJECT_COLUMNS)
        frame = pd.concat([pd.read_csv(rejects, dtype=str, keep_default_na=False), extra])
        write_csv(rejects, frame.sort_values("file", kind="stable"))
    if labels_out is None:
        return
    ids = converted_ids(out)
    table = table.astype({"sop_uid": str}).drop_duplicates("sop_uid").set_index("sop_uid")
    keep = [uid for uid in ids if uid in table.index]
    write_csv(labels_out, table.loc[keep].reset_index())
    log.info(
        "labels table: %d of %d converted slices have labels -> %s", len(keep), len(ids), labels_out
    )


main = stage_main("convert", DESCRIPTION, add_arguments, run, epilog=LAYOUT_HELP, raw_help=True)


if __name__ == "__main__":
    sys.exit(main())
