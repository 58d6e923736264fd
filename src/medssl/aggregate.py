"""Stage ``aggregate``: every fine-tuning run's ``metrics.json`` into the tidy ``runs.csv``.

``python -m medssl.aggregate --out results/tables/runs.csv METRICS.json... | @list.txt``

``--partial`` ignores the list and takes every ``metrics.json`` under
``--root``, for looking at a sweep while it runs. A broken file stops the
stage with its name and key (:class:`medssl.analysis.runs.MetricsError`) and
nothing is written. The table is :func:`medssl.analysis.runs.build_runs`'s.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medssl.analysis.runs import build_runs, discover
from medssl.cli import add_output_argument, stage_main
from medssl.core.provenance import write_table

log = logging.getLogger(__name__)

DESCRIPTION = "Collect metrics.json files into the tidy runs.csv table."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("metrics", nargs="*", help="metrics.json files (or @listfile)")
    add_output_argument(parser, "runs.csv to write", provenance=True)
    parser.add_argument(
        "--partial",
        action="store_true",
        help="ignore the file list and take every metrics.json under --root",
    )
    parser.add_argument("--root", default="results/finetune", help="root searched by --partial")


def metrics_files(args: argparse.Namespace) -> list[Path]:
    """The files to aggregate: those listed, or with ``--partial`` those under ``--root``."""
    if args.partial:
        paths = discover(args.root)
        log.info("found %d metrics.json under %s", len(paths), args.root)
        return paths
    if not args.metrics:
        raise ValueError("give metrics.json files (or @listfile), or --partial")
    return [Path(p) for p in args.metrics if str(p).strip()]


def run(args: argparse.Namespace) -> None:
    paths = metrics_files(args)
    runs = build_runs(paths)
    settings = {"partial": args.partial, "root": args.root if args.partial else None}
    counts = {"n_files": len(paths), "n_rows": len(runs)}
    write_table(args.out, runs, "aggregate", settings, sidecar=not args.no_provenance, extra=counts)
    log.info("wrote %d rows from %d runs to %s", len(runs), len(paths), args.out)


main = stage_main(
    "aggregate",
    DESCRIPTION,
    add_arguments,
    run,
    epilog="Arguments may be read from a file, one per line: @list.txt",
    fromfile_prefix_chars="@",
)


if __name__ == "__main__":
    sys.exit(main())
