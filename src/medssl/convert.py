"""Stage ``convert``: a DICOM folder -> one HDF5 dataset and its rejects CSV.

``python -m medssl.convert SRC_DIR OUT.h5`` (standalone: CT, raw HU, native size) or
``python -m medssl.convert --dicom-dir DIR --out H5 --rejects CSV --settings JSON --threads N``
(the workflow). ``--help`` lists every option and the HDF5 layout; the work is
:func:`medssl.datasets.conversion.convert`.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

from medssl.cli import json_object, stage_main
from medssl.datasets.conversion import COMPRESSION, INTENSITY_POLICIES, STANDALONE_DEFAULTS, convert
from medssl.datasets.conversion.intensity import HU_DTYPES
from medssl.dicom.geometry import (
    DEFAULT_GAP_TOLERANCE,
    GAP_POLICIES,
    TILT_POLICIES,
    TILT_TOLERANCE_DEG,
)

DESCRIPTION = (
    "Convert a folder of DICOM files (any nesting, any names) into one HDF5 "
    "dataset. Defaults: CT only, raw HU as int16, native size, gaps split. "
    "Writes OUT.rejects.csv beside OUT.h5 unless --rejects is given."
)

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
  /meta/spacing        (N, 3) float32, mm: row, column, slice
  root attributes      provenance (JSON: version, settings), n_files_seen,
                       n_converted, n_rejected, n_series, reject_reasons
                       (JSON), series_findings (JSON: gaps, gantry tilt)
Rows are ordered by patient, study, series, position. Every file found is
converted or listed in the rejects CSV (file, series_uid, reason).
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
)


def _window(text: str) -> tuple[float, float]:
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"window must be CENTER,WIDTH, got {text!r}") from err
    return center, width


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", nargs="?", type=Path, help="DICOM folder (SRC_DIR)")
    parser.add_argument("out_h5", nargs="?", type=Path, help="HDF5 file to write (OUT.h5)")
    parser.add_argument("--dicom-dir", type=Path, help="same as SRC_DIR")
    parser.add_argument("--out", type=Path, help="same as OUT.h5")
    parser.add_argument("--rejects", type=Path, help="rejects CSV (default OUT.rejects.csv)")
    parser.add_argument(
        "--settings",
        type=json_object,
        default=None,
        help="JSON object of the data.convert config section; replaces the standalone "
        "defaults, the options below then override single keys",
    )
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
    parser.add_argument(
        "--compression", choices=COMPRESSION.names(), help="HDF5 filter (default blosc)"
    )
    parser.add_argument("--threads", type=int, default=1, help="worker processes (default 1)")


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """Settings from --settings (or the standalone defaults), then the single options."""
    settings = copy.deepcopy(STANDALONE_DEFAULTS if args.settings is None else args.settings)
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


def run(args: argparse.Namespace) -> None:
    src = args.dicom_dir or args.src
    out = args.out or (args.out_h5 if args.dicom_dir is None else args.src)
    if src is None or out is None:
        raise ValueError("give SRC_DIR and OUT.h5 (or --dicom-dir and --out)")
    rejects = args.rejects or out.with_name(out.stem + ".rejects.csv")
    convert(src, out, rejects, settings_from(args), threads=args.threads)


main = stage_main("convert", DESCRIPTION, add_arguments, run, epilog=LAYOUT_HELP, raw_help=True)


if __name__ == "__main__":
    sys.exit(main())
