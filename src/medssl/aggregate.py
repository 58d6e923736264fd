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
from collections.abc import Sequence
from pathlib import Path

from medssl.analysis.runs import build_runs, discover
from medssl.cli import Stage, run_stage
from medssl.core.files import write_csv
from medssl.core.provenance import write_sidecar

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("metrics", nargs="*", help="metrics.json files (or @listfile)")
    parser.add_argument("--out", required=True, help="runs.csv to write")
    parser.add_argument(
        "--partial",
        action="store_true",
        help="ignore the file list and take every metrics.json under --root",
    )
    parser.add_argument("--root", default="results/finetune", help="root searched by --partial")
    parser.add_argument(
        "--no-provenance",
        action="store_true",
        help="do not write the <out>.provenance.json sidecar",
    )


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
    write_csv(args.out, runs)
    if not args.no_provenance:
        settings = {"partial": args.partial, "root": args.root if args.partial else None}
        write_sidecar(
            args.out, "aggregate", settings, extra={"n_files": len(paths), "n_rows": len(runs)}
        )
    log.info("wrote %d rows from %d runs to %s", len(runs), len(paths), args.out)


STAGE = Stage(
    name="aggregate",
    description="Collect metrics.json files into the tidy runs.csv table.",
    add_arguments=add_arguments,
    run=run,
    epilog="Arguments may be read from a file, one per line: @list.txt",
    fromfile_prefix_chars="@",
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
