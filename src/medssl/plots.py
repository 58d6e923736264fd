"""Stage ``plots``: the label-efficiency figure (PNG + PDF) of one task and metric.

``python -m medssl.plots --summary summary.csv --task T [--metric auc] --out T.png``

The figure is :func:`medssl.analysis.curves.label_efficiency_figure`'s; the
PDF is written beside the PNG with the same stem.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd

from medssl.analysis.curves import label_efficiency_figure, save_figure
from medssl.analysis.statistics import resolve_settings
from medssl.cli import add_settings_argument, stage_main

log = logging.getLogger(__name__)

DESCRIPTION = "Label-efficiency figure (PNG + PDF) of one task and metric."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary", required=True, help="summary.csv from medssl.stats")
    parser.add_argument("--task", required=True)
    parser.add_argument("--metric", default="auc")
    parser.add_argument("--out", required=True, help="PNG path; the PDF gets the same stem")
    add_settings_argument(
        parser, "JSON of the stats section (its confidence labels the error bars)"
    )


def run(args: argparse.Namespace) -> None:
    # The PDF backend's font subsetting logs every glyph table at INFO.
    logging.getLogger("fontTools").setLevel(logging.WARNING)
    summary = pd.read_csv(args.summary)
    confidence = resolve_settings(args.settings)["confidence"]
    fig = label_efficiency_figure(summary, args.task, args.metric, confidence=confidence)
    png, pdf = save_figure(fig, args.out)
    log.info("wrote %s and %s", png, pdf)


main = stage_main("plots", DESCRIPTION, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
