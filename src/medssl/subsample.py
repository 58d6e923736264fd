"""Nested training-subset ranks for one fine-tuning seed.

``python -m medssl.subsample --partition CSV --seed N --out results/splits/TASK/seedN.csv``

The file ranks every training patient inside its stratum; the subset for a
fraction is read off it by :func:`medssl.datasets.splits.select_training`. Keeping the
fractions out of this file means adding a fraction reruns nothing that exists,
and the subsets of one seed are nested by construction.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medssl.cli import setup_logging
from medssl.core.files import write_csv
from medssl.datasets.splits import make_subsets, read_partition

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medssl.subsample",
        description="Rank the training patients of a partition for nested subsets.",
    )
    parser.add_argument("--partition", required=True, help="partition CSV from medssl.datasets.splits")
    parser.add_argument("--seed", required=True, type=int, help="subset seed (a fine-tuning seed)")
    parser.add_argument("--out", required=True, help="subsets CSV to write")
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        subsets = make_subsets(read_partition(args.partition), args.seed)
    except (ValueError, OSError) as err:
        log.error("%s", err)
        return 1
    write_csv(args.out, subsets)
    log.info(
        "wrote %s: %d training patients ranked with seed %d", args.out, len(subsets), args.seed
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
