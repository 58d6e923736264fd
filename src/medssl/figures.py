"""Stage ``figures``: the comparison figures (PNG + PDF) beside the label-efficiency curves.

::

    python -m medssl.figures bars --table summary.csv --task T --metric auc --out T.png
    python -m medssl.figures heatmap --table summary.csv --fraction 0.1 --metrics T=auc,U=dice ...
    python -m medssl.figures forest --table label_efficiency.csv --out forest.png

The figures are those of :data:`medssl.analysis.figures.FIGURES`; a kind
without one of the options it needs fails with their names.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd

from medssl.analysis.curves import save_figure
from medssl.analysis.figures import FIGURES, draw_figure
from medssl.cli import add_settings_argument, stage_main

log = logging.getLogger(__name__)

DESCRIPTION = "Comparison figures (PNG + PDF): grouped bars, heat map, forest plot."


def task_metric_map(text: str) -> dict[str, str]:
    """argparse type: ``task=metric,task=metric`` -> dict, the heat map's metric per task."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise argparse.ArgumentTypeError(f"expected task=metric[,task=metric], got {text!r}")
    return {task.strip(): metric.strip() for task, metric in pairs}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=FIGURES.names())
    parser.add_argument(
        "--table", required=True, help="summary.csv (bars, heatmap) or label_efficiency.csv"
    )
    parser.add_argument("--out", required=True, help="PNG path; the PDF gets the same stem")
    parser.add_argument("--task", help="bars: the task")
    parser.add_argument("--metric", help="bars: the metric")
    parser.add_argument("--fraction", type=float, help="heatmap: the training fraction")
    parser.add_argument("--metrics", type=task_metric_map, help="heatmap: task=metric,...")
    add_settings_argument(parser, "stats section JSON")


def run(args: argparse.Namespace) -> None:
    missing = [f"--{name}" for name in FIGURES[args.kind].needs if getattr(args, name) is None]
    if missing:
        raise ValueError(f"{args.kind} needs {', '.join(missing)}")
    # The PDF backend's font subsetting logs every glyph table at INFO.
    logging.getLogger("fontTools").setLevel(logging.WARNING)
    options = {name: getattr(args, name) for name in FIGURES[args.kind].needs}
    fig = draw_figure(args.kind, pd.read_csv(args.table), args.settings, **options)
    png, pdf = save_figure(fig, args.out)
    log.info("wrote %s and %s", png, pdf)


main = stage_main("figures", DESCRIPTION, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
