"""Stage ``masks``: a segmentation task's masks, aligned row by row with its dataset.

``python -m medssl.masks --data H5 --format seg|rtstruct|folder|rle|preset --source PATH
--structure NAME [--dicom-dir DIR] [--preset NAME] --out results/masks/TASK.h5``

``--format preset --preset montgomery --source ROOT --structure lung`` reads a
dataset preset's own mask files; ``--format rle --source train-rle.csv`` SIIM's
run-length table.

The readers and the mask file layout are :mod:`medssl.datasets.mask_sources`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medssl.cli import stage_main
from medssl.core.provenance import record
from medssl.datasets.mask_sources import READERS, build_masks, write_masks

log = logging.getLogger(__name__)

DESCRIPTION = "Attach segmentation masks to a converted dataset; write the mask file."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="converted dataset (.h5)")
    parser.add_argument("--format", required=True, choices=READERS.names())
    parser.add_argument(
        "--source",
        required=True,
        help="SEG/RTSTRUCT file or folder, PNG root, train-rle.csv, or a preset's release root",
    )
    parser.add_argument("--structure", required=True, help="segment label, ROI name or subfolder")
    parser.add_argument("--dicom-dir", help="the dataset's DICOM folder (RTSTRUCT geometry)")
    parser.add_argument(
        "--preset", help="dataset preset whose masks --source holds (--format preset)"
    )
    parser.add_argument("--out", required=True, help="mask file (.h5) to write")


def run(args: argparse.Namespace) -> None:
    masks, annotated = build_masks(
        args.data, args.format, args.source, args.structure, args.dicom_dir, args.preset
    )
    settings = {"format": args.format, "source": args.source, "structure": args.structure}
    if args.preset:
        settings["preset"] = args.preset
    provenance = record("masks", settings, 0)
    write_masks(args.out, masks, annotated, {**settings, "provenance": provenance})
    log.info("wrote %s", args.out)


main = stage_main("masks", DESCRIPTION, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
