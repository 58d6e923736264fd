"""Stage ``efficiency``: label-efficiency slopes, slope tests, normalised AUC and drops.

``python -m medssl.efficiency --runs runs.csv --settings '<stats JSON>' --out label_efficiency.csv``

One model per task and metric (:func:`medssl.analysis.efficiency.label_efficiency`),
on the logit scale for bounded scores by default (``stats.efficiency_scale``);
``<out>.provenance.json`` records the settings it was fitted with.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd

from medssl.analysis.efficiency import efficiency_settings, label_efficiency
from medssl.cli import add_table_arguments, stage_main
from medssl.core.provenance import write_table

log = logging.getLogger(__name__)

DESCRIPTION = "Label-efficiency slopes, slope tests, normalised AUC and relative drops."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_table_arguments(
        parser, "runs", "label_efficiency.csv to write", "JSON of the config's stats section"
    )


def run(args: argparse.Namespace) -> None:
    settings = efficiency_settings(args.settings)
    table = label_efficiency(pd.read_csv(args.runs), settings)
    write_table(args.out, table, "efficiency", settings, sidecar=not args.no_provenance)
    log.info("wrote %d rows to %s", len(table), args.out)


main = stage_main("efficiency", DESCRIPTION, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
