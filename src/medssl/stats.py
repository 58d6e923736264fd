"""Stage ``stats``: per-cell statistics, tests against the best and marks (``summary.csv``).

``python -m medssl.stats --runs runs.csv --settings '<stats section as JSON>' --out summary.csv``

The statistics are :func:`medssl.analysis.statistics.summarise`'s; the
settings that made them are recorded in ``<out>.provenance.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd

from medssl.analysis.statistics import resolve_settings, summarise
from medssl.cli import add_table_arguments, stage_main
from medssl.core.provenance import write_table

log = logging.getLogger(__name__)

DESCRIPTION = "Per-cell statistics, tests against the best and marks: summary.csv."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings_help = "JSON of the config's stats section (confidence, alpha, test, reference...)"
    add_table_arguments(parser, "runs", "summary.csv to write", settings_help)


def run(args: argparse.Namespace) -> None:
    settings = resolve_settings(args.settings)
    summary = summarise(pd.read_csv(args.runs), settings)
    write_table(args.out, summary, "stats", settings, sidecar=not args.no_provenance)
    counts = summary["mark"].value_counts().to_dict()
    log.info("wrote %d rows to %s (marks: %s)", len(summary), args.out, counts)


main = stage_main("stats", DESCRIPTION, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
