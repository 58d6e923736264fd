"""Stage ``split``: the patient-level partition of one task's labelled slices.

``python -m medssl.split --data H5 --labels CSV --task JSON [--official-splits CSV]
--out results/splits/TASK.csv``

Labels are joined to the dataset and partitioned by
:func:`medssl.datasets.splits.partition_files`; a segmentation task's ``--labels``
is its mask file, and with ``split: {source: official}`` ``--official-splits``
is the dataset's label table, which holds the release's split. How the split
was made (source, carved splits, patients moved off a second official list)
is recorded in ``<out>.provenance.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medssl.cli import json_arg, stage_main
from medssl.core.files import write_csv
from medssl.core.provenance import write_sidecar
from medssl.datasets.splits import partition_files

log = logging.getLogger(__name__)

DESCRIPTION = "Join labels to a converted dataset and write the patient-level partition."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="converted dataset (.h5)")
    parser.add_argument(
        "--labels", required=True, help="label table (.csv); the mask file for segmentation"
    )
    parser.add_argument(
        "--task",
        required=True,
        type=json_arg,
        help="task JSON: name, dataset, column, type, labels_key, split {source, val, test, seed}",
    )
    parser.add_argument(
        "--official-splits",
        help="table with sop_uid and official_split (segmentation, split source official)",
    )
    parser.add_argument("--out", required=True, help="partition CSV to write")


def run(args: argparse.Namespace) -> None:
    partition = partition_files(args.data, args.labels, args.task, args.official_splits)
    write_csv(args.out, partition)
    write_sidecar(args.out, "split", args.task, extra={"split": partition.attrs.get("split", {})})
    log.info("wrote %s", args.out)


main = stage_main("split", DESCRIPTION, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
