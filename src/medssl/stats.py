"""Stage ``stats``: per-cell statistics, comparisons with the best and marks (``summary.csv``).

``python -m medssl.stats --runs runs.csv --settings '<stats section as JSON>' --out summary.csv``

``python -m medssl.stats --published table.csv --std-ddof 0 --out marks.csv`` re-analyses a
published table (columns ``task, metric, init, mean, std, n``, optionally
``fraction``) with the same comparisons: ``--std-ddof`` is the ddof the authors'
stds were computed with (0: NumPy's population std), and the output's
``flips_within_rounding`` column flags the marks that change when the
published numbers move within their rounding (the digits are read from the
file, or given with ``--decimals``).

With ``--predictions-root results/finetune`` and ``stats.test_bootstrap = N > 0``
the summary gains ``test_se, ci_total_low, ci_total_high``: the seed interval
widened by a patient-level bootstrap of the test split
(:mod:`medssl.analysis.bootstrap`), for the metrics it can recompute (AUC, Dice).

The statistics are :func:`medssl.analysis.statistics.summarise`'s (or
:func:`~medssl.analysis.statistics.summary_from_published`'s); the settings
and options that made them are recorded in ``<out>.provenance.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd

from medssl.analysis.bootstrap import add_test_set_uncertainty, collect_predictions
from medssl.analysis.delong import add_delong_vs_reference
from medssl.analysis.statistics import (
    PUBLISHED_COLUMNS,
    published_decimals,
    resolve_settings,
    summarise,
    summary_from_published,
)
from medssl.cli import add_output_argument, add_settings_argument, stage_main
from medssl.core.provenance import write_table

log = logging.getLogger(__name__)

DESCRIPTION = "Per-cell statistics, comparisons with the best and marks: summary.csv."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", help="runs.csv to read (from medssl.aggregate)")
    source.add_argument(
        "--published", help="a published table: task, metric, init, mean, std, n [, fraction]"
    )
    add_settings_argument(
        parser, "JSON of the config's stats section (confidence, alpha, test, reference...)"
    )
    add_output_argument(
        parser, "summary.csv (or the published table's marks) to write", provenance=True
    )
    parser.add_argument(
        "--predictions-root",
        default=None,
        help="--runs: folder of the runs' metrics.json and test_predictions.npz; with "
        "stats.test_bootstrap > 0 adds test-set intervals (patient-level bootstrap)",
    )
    parser.add_argument(
        "--std-ddof",
        type=int,
        choices=(0, 1),
        default=1,
        help="--published: ddof of the published stds (0: population std, NumPy's default)",
    )
    parser.add_argument(
        "--decimals",
        type=int,
        default=None,
        help="--published: digits the table was rounded to (default: read from the file)",
    )


def read_published(path: str, decimals: int | None) -> tuple[pd.DataFrame, int]:
    """The published table with numeric columns, and the digits its means and stds carry."""
    text = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = set(PUBLISHED_COLUMNS) - set(text.columns)
    if missing:
        raise ValueError(f"{path}: published table lacks columns {sorted(missing)}")
    table = text.copy()
    for column in ("mean", "std", "n", *(("fraction",) if "fraction" in text.columns else ())):
        converted = pd.to_numeric(text[column], errors="coerce")
        bad = text[column][converted.isna()]
        if not bad.empty:
            raise ValueError(f"{path}: column {column!r} holds non-numbers {sorted(set(bad))}")
        table[column] = converted
    digits = published_decimals([*text["mean"], *text["std"]]) if decimals is None else decimals
    return table, digits


def run(args: argparse.Namespace) -> None:
    settings = resolve_settings(args.settings)
    if args.published:
        table, digits = read_published(args.published, args.decimals)
        out = summary_from_published(table, settings, std_ddof=args.std_ddof, decimals=digits)
        options = {"published": args.published, "std_ddof": args.std_ddof, "decimals": digits}
        write_table(args.out, out, "stats", settings, sidecar=not args.no_provenance, extra=options)
        flips = int(out["flips_within_rounding"].sum())
        log.info("wrote %d rows to %s (%d marks flip within rounding)", len(out), args.out, flips)
        return
    summary = summarise(pd.read_csv(args.runs), settings)
    wants_predictions = settings["test_bootstrap"] > 0 or settings["delong"]
    if args.predictions_root and wants_predictions:
        predictions = collect_predictions(args.predictions_root)
        if settings["test_bootstrap"] > 0:
            summary = add_test_set_uncertainty(
                summary,
                predictions,
                settings["test_bootstrap"],
                settings["bootstrap_seed"],
                settings["confidence"],
            )
        if settings["delong"]:
            summary = add_delong_vs_reference(summary, predictions, settings["reference"])
    elif wants_predictions:
        log.warning(
            "stats.test_bootstrap or stats.delong is set but no --predictions-root: "
            "no test-set intervals or DeLong tests"
        )
    write_table(args.out, summary, "stats", settings, sidecar=not args.no_provenance)
    counts = summary["mark"].value_counts().to_dict()
    log.info("wrote %d rows to %s (marks: %s)", len(summary), args.out, counts)


main = stage_main("stats", DESCRIPTION, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
