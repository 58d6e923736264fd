"""Stage ``subsample``: nested training-subset ranks for one fine-tuning seed.

``python -m medssl.subsample --partition CSV --seed N --out results/splits/TASK/seedN.csv``

The file ranks every training patient inside its stratum; the subset for a
fraction is read off it by :func:`medssl.datasets.splits.select_training`.
Keeping the fractions out of this file means adding a fraction reruns nothing
that exists, and the subsets of one seed are nested by construction.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medssl.cli import stage_main
from medssl.core.files import write_csv
from medssl.datasets.splits import make_subsets, read_partition

log = logging.getLogger(__name__)

DESCRIPTION = "Rank the training patients of a partition for nested subsets."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--partition", required=True, help="partition CSV from medssl.split")
    parser.add_argument("--seed", required=True, type=int, help="subset seed (a fine-tuning seed)")
    parser.add_argument("--out", required=True, help="subsets CSV to write")


def run(args: argparse.Namespace) -> None:
    subsets = make_subsets(read_partition(args.partition), args.seed)
    write_csv(args.out, subsets)
    log.info(
        "wrote %s: %d training patients ranked with seed %d", args.out, len(subsets), args.seed
    )


main = stage_main("subsample", DESCRIPTION, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
