"""Stage ``stats``: per-cell statistics, tests against the best and marks (``summary.csv``).

``python -m medssl.stats --runs runs.csv --settings '<stats section as JSON>' --out summary.csv``

The statistics are :func:`medssl.analysis.statistics.summarise`'s; the
settings that made them are recorded in ``<out>.provenance.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import pandas as pd

from medssl.analysis.statistics import resolve_settings, summarise
from medssl.cli import Stage, add_settings_argument, run_stage
from medssl.core.files import write_csv
from medssl.core.provenance import write_sidecar

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", required=True, help="tidy runs.csv from medssl.aggregate")
    add_settings_argument(
        parser, "JSON of the config's stats section (confidence, alpha, test, reference, ...)"
    )
    parser.add_argument("--out", required=True, help="summary.csv to write")
    parser.add_argument(
        "--no-provenance", action="store_true", help="skip the <out>.provenance.json sidecar"
    )


def run(args: argparse.Namespace) -> None:
    settings = resolve_settings(args.settings)
    summary = summarise(pd.read_csv(args.runs), settings)
    write_csv(args.out, summary)
    if not args.no_provenance:
        write_sidecar(args.out, "stats", settings)
    counts = summary["mark"].value_counts().to_dict()
    log.info("wrote %d rows to %s (marks: %s)", len(summary), args.out, counts)


STAGE = Stage(
    name="stats",
    description="Per-cell statistics, tests against the best and marks: summary.csv.",
    add_arguments=add_arguments,
    run=run,
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
