"""Stage ``synth``: the synthetic CT cohort as DICOM, its label table and lung masks.

``python -m medssl.synth --out-dir DIR --labels CSV --settings JSON [--masks-dir DIR]``

The cohort is :mod:`medssl.datasets.synthetic`; ``--settings`` is the dataset's
``synthetic`` config section (defaults in :data:`~medssl.datasets.synthetic.DEFAULTS`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medssl.cli import add_settings_argument, stage_main
from medssl.datasets.synthetic import synthesize

DESCRIPTION = "Synthetic chest/abdomen CT cohort written as real DICOM, with slice labels."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", required=True, type=Path, help="DICOM folder to create")
    parser.add_argument("--labels", required=True, type=Path, help="label table (CSV) to write")
    add_settings_argument(parser, "JSON settings (the dataset's synthetic section)")
    parser.add_argument(
        "--masks-dir", type=Path, help="folder for the lung masks (lung/<sop_uid>.png)"
    )


def run(args: argparse.Namespace) -> None:
    synthesize(args.out_dir, args.labels, args.settings, args.masks_dir)


main = stage_main("synth", DESCRIPTION, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
