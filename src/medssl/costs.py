"""Stage ``costs``: compute cost per initialisation beside its scores.

::

    python -m medssl.costs --benchmarks benchmarks [more files or folders] --results results \
        --summary results/tables/summary.csv --out results/tables/costs.csv \
        --markdown results/tables/costs.md

Reads the Snakemake benchmark files of the pre-training, import, supervised
and fine-tuning rules, and each run's device from its own record under
``--results`` (:mod:`medssl.analysis.costs`); ``--default-device`` (the
config's ``compute.device``) stands in where a record names none. Writes the
CSV with its ``<out>.provenance.json`` sidecar and, with ``--markdown``, the
same table as Markdown.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from medssl.analysis.costs import cost_table, find_benchmarks, markdown, with_scores
from medssl.cli import add_output_argument, stage_main
from medssl.core.files import write_text
from medssl.core.provenance import write_sidecar, write_table

log = logging.getLogger(__name__)

DESCRIPTION = "Compute cost (seconds, GPU-hours) per initialisation beside its scores."

OPTIONS = ("benchmarks", "results", "summary", "default_device", "out", "markdown")
"""The stage's own options, recorded in every sidecar."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        required=True,
        help="benchmark .tsv files, or the benchmarks folder (or a folder holding it)",
    )
    parser.add_argument(
        "--results", type=Path, default=None, help="results/ folder: each run's device"
    )
    parser.add_argument("--summary", type=Path, default=None, help="summary.csv to join")
    parser.add_argument(
        "--default-device",
        default=None,
        help="device of runs whose record names none (compute.device: cpu, cuda, auto)",
    )
    add_output_argument(parser, "cost table CSV to write", provenance=True)
    parser.add_argument("--markdown", default=None, help="Markdown version to write")


def run(args: argparse.Namespace) -> None:
    table = cost_table(find_benchmarks(args.benchmarks), args.results, args.default_device)
    if args.summary is not None:
        table = with_scores(table, pd.read_csv(args.summary))
    settings = {name: getattr(args, name) for name in OPTIONS}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()}
    write_table(args.out, table, "costs", settings, sidecar=not args.no_provenance)
    log.info("wrote %d rows to %s", len(table), args.out)
    if args.markdown:
        write_text(args.markdown, markdown(table))
        if not args.no_provenance:
            write_sidecar(args.markdown, "costs", settings)
        log.info("wrote %s", args.markdown)


main = stage_main("costs", DESCRIPTION, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
