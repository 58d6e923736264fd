"""Stage ``efficiency``: label-efficiency slopes, slope tests, normalised AUC and drops.

``python -m medssl.efficiency --runs runs.csv --settings '<stats JSON>' --out label_efficiency.csv``

The table is :func:`medssl.analysis.efficiency.label_efficiency`'s; the
settings that made it are recorded in ``<out>.provenance.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import pandas as pd

from medssl.analysis.efficiency import efficiency_settings, label_efficiency
from medssl.cli import Stage, add_settings_argument, run_stage
from medssl.core.files import write_csv
from medssl.core.provenance import write_sidecar

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", required=True, help="tidy runs.csv from medssl.aggregate")
    add_settings_argument(parser, "JSON of the config's stats section")
    parser.add_argument("--out", required=True, help="label_efficiency.csv to write")
    parser.add_argument(
        "--no-provenance", action="store_true", help="skip the <out>.provenance.json sidecar"
    )


def run(args: argparse.Namespace) -> None:
    settings = efficiency_settings(args.settings)
    table = label_efficiency(pd.read_csv(args.runs), settings)
    write_csv(args.out, table)
    if not args.no_provenance:
        write_sidecar(args.out, "efficiency", settings)
    log.info("wrote %d rows to %s", len(table), args.out)


STAGE = Stage(
    name="efficiency",
    description="Label-efficiency slopes, slope tests, normalised AUC and relative drops.",
    add_arguments=add_arguments,
    run=run,
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
