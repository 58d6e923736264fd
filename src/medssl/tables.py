"""Stage ``tables``: ``summary.csv`` rendered as Markdown, CSV and LaTeX tables.

``python -m medssl.tables --summary summary.csv --settings '<stats JSON>' --out results.md``
``python -m medssl.tables --summary summary.csv --task T --csv T.csv --latex T.tex``

The Markdown file holds every task; CSV and LaTeX hold one ``--task``. Bold
is the best mean of a column, ↓ an init shown not to be the best and ≈ one
shown equivalent to it within ``stats.equivalence_margin``, as the stats stage
marked them; the differences with their intervals, the design and the notes
follow each table (:mod:`medssl.analysis.tables`).
Each file gets a ``<file>.provenance.json`` sidecar.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd

from medssl.analysis.tables import markdown_table, task_csv, task_latex
from medssl.cli import add_settings_argument, stage_main
from medssl.core.files import write_csv, write_text
from medssl.core.provenance import write_sidecar

log = logging.getLogger(__name__)

DESCRIPTION = "Render summary.csv as Markdown, CSV and LaTeX tables with marks and differences."

OPTIONS = (
    "summary",
    "out",
    "task",
    "csv",
    "latex",
    "settings",
    "metric_order",
    "init_order",
    "decimals",
)
"""The stage's own options, recorded in every sidecar."""


def comma_list(text: str) -> list[str]:
    """argparse type: ``a, b,c`` -> ``["a", "b", "c"]`` (empty items dropped)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary", required=True, help="summary.csv from medssl.stats")
    parser.add_argument("--out", help="Markdown file of all tasks to write")
    parser.add_argument("--task", help="task of the --csv / --latex tables")
    parser.add_argument("--csv", help="CSV table of --task to write")
    parser.add_argument("--latex", help="LaTeX (booktabs) tables of --task to write")
    add_settings_argument(
        parser, "JSON of the stats section the summary was made with (for the legend)"
    )
    parser.add_argument(
        "--metric-order", type=comma_list, default=None, help="e.g. auc,accuracy,f1"
    )
    parser.add_argument(
        "--init-order", type=comma_list, default=None, help="row order, e.g. scratch,imagenet"
    )
    parser.add_argument(
        "--decimals", type=int, default=None, help="override: 3 for 0-1 metrics, else 2"
    )


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse a command that would write nothing, or a per-task table without its task."""
    if not (args.out or args.csv or args.latex):
        raise ValueError("give at least one of --out, --csv, --latex")
    if (args.csv or args.latex) and not args.task:
        raise ValueError("--csv and --latex need --task")


def run(args: argparse.Namespace) -> None:
    check_outputs(args)
    summary = pd.read_csv(args.summary)
    order = {"metric_order": args.metric_order, "init_order": args.init_order}
    if args.out:
        text = markdown_table(summary, args.settings, decimals=args.decimals, **order)
        write_text(args.out, text)
        log.info("wrote %s", args.out)
    if args.csv:
        write_csv(args.csv, task_csv(summary, args.task, decimals=args.decimals, **order))
        log.info("wrote %s", args.csv)
    if args.latex:
        text = task_latex(summary, args.task, args.settings, decimals=args.decimals, **order)
        write_text(args.latex, text)
        log.info("wrote %s", args.latex)
    settings = {name: getattr(args, name) for name in OPTIONS}
    for written in (args.out, args.csv, args.latex):
        if written:
            write_sidecar(written, "tables", settings)


main = stage_main("tables", DESCRIPTION, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
