"""Markdown tables of ``summary.csv`` in the style of study B's result tables.

One section per task and metric; rows are initialisations, columns training
fractions (as percentages); cells read ``mean ± std`` over seeds with the same
number of decimals throughout a table. The best init of a column is **bold**
and inits not significantly different from it carry a dagger (†). The marks are
taken from ``summary.csv`` as the stats stage computed them; this module only
renders them, and the legend under every table states the test, correction and
alpha (from the same ``stats`` settings) so the table says what it means.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from medssl.io import write_text
from medssl.stats import metric_direction, resolve_settings, settings_arg

log = logging.getLogger(__name__)

METRIC_LABELS: dict[str, str] = {
    "auc": "AUC",
    "mean_auc": "mean AUC",
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "f1": "F1",
    "macro_f1": "Macro F1",
    "dice": "Dice",
    "iou": "IoU",
    "loss": "Loss",
}
"""Display names for metrics; anything else is shown as written in runs.csv."""

TEST_LABELS: dict[str, str] = {
    "welch": "Welch's unequal-variance t-test",
    "student": "Student's pooled-variance t-test",
}
CORRECTION_LABELS: dict[str, str] = {
    "holm": "Holm-corrected within each column",
    "fdr_bh": "Benjamini-Hochberg FDR-corrected within each column",
    "none": "not corrected for multiple comparisons",
}
DAGGER = "†"
MISSING = "–"


def metric_label(metric: str) -> str:
    """Human name of a metric for headings and axis labels."""
    return METRIC_LABELS.get(metric, metric)


def fraction_label(fraction: float) -> str:
    """A training fraction as a percentage: 0.1 -> '10%', 0.025 -> '2.5%'."""
    return f"{100 * float(fraction):.6g}%"


def decimals_for(values: Sequence[float] | np.ndarray) -> int:
    """3 decimals for metrics on a 0-1 scale (AUC, accuracy), 2 for anything larger.

    Decided per table so every cell of one table has the same precision.
    """
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0 or (arr.min() >= 0 and arr.max() <= 1):
        return 3
    return 2


def format_cell(row: Mapping[str, Any] | None, decimals: int, n_max: int) -> str:
    """``mean ± std`` with bold for the best, a dagger for equivalents and a short n."""
    if row is None or not math.isfinite(float(row["mean"])):
        return MISSING
    text = f"{float(row['mean']):.{decimals}f}"
    std = float(row["std"])
    if math.isfinite(std):
        text += f" ± {std:.{decimals}f}"
    mark = row.get("mark")
    if mark == "best":
        text = f"**{text}**"
    elif mark == "equivalent":
        text += f" {DAGGER}"
    n = int(row["n"])
    if n != n_max:
        text += f" (n={n})"
    return text


def legend(settings: Mapping[str, Any] | None, direction: str, n_max: int) -> str:
    """The line under a table that says what bold and † mean, and by which test."""
    cfg = resolve_settings(settings)
    better = "highest" if direction == "higher" else "lowest"
    return (
        f"Mean ± sample std over n = {n_max} seeds (n shown where fewer runs gave a value). "
        f"**Bold**: {better} mean in the column. "
        f"{DAGGER}: not significantly different from the best "
        f"({TEST_LABELS[cfg['test']]}, {CORRECTION_LABELS[cfg['correction']]}, "
        f"α = {cfg['alpha']:g}; also where no test is possible: n < 2 or zero variance). "
        f"Unmarked: significantly worse than the best."
    )


def _ordered(values: Sequence[str], order: Sequence[str] | None) -> list[str]:
    """Listed names first in the given order, then the rest sorted; absent ones skipped."""
    present = sorted(set(values))
    if not order:
        return present
    head = [v for v in order if v in present]
    return head + [v for v in present if v not in head]


def section_table(
    frame: pd.DataFrame,
    settings: Mapping[str, Any] | None,
    init_order: Sequence[str] | None = None,
    decimals: int | None = None,
) -> str:
    """One Markdown table (rows = inits, columns = fractions) with its legend."""
    fractions = sorted(frame["fraction"].astype(float).unique())
    inits = _ordered(frame["init"].astype(str).tolist(), init_order)
    if decimals is None:
        decimals = decimals_for(np.concatenate([frame["mean"], frame["std"]]))
    n_max = int(frame["n"].max()) if len(frame) else 0
    cells = {(str(r["init"]), float(r["fraction"])): r for r in frame.to_dict(orient="records")}
    header = ["Initialisation", *(fraction_label(f) for f in fractions)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", *(["---:"] * len(fractions))]) + "|",
    ]
    for init in inits:
        row = [init, *(format_cell(cells.get((init, f)), decimals, n_max) for f in fractions)]
        lines.append("| " + " | ".join(row) + " |")
    direction = metric_direction(
        str(frame["metric"].iloc[0]), resolve_settings(settings).get("directions")
    )
    return "\n".join(lines) + "\n\n" + legend(settings, direction, n_max) + "\n"


def markdown_table(
    summary: pd.DataFrame,
    settings: Mapping[str, Any] | None = None,
    metric_order: Sequence[str] | None = None,
    init_order: Sequence[str] | None = None,
    decimals: int | None = None,
) -> str:
    """The whole Markdown document: one section per task, one table per metric."""
    parts = ["# Results", ""]
    parts.append(
        "Test-set metrics per task; columns are the fraction of labelled training "
        "patients used for fine-tuning."
    )
    for task in sorted(summary["task"].astype(str).unique()):
        parts += ["", f"## {task}"]
        task_rows = summary[summary["task"].astype(str) == task]
        for metric in _ordered(task_rows["metric"].astype(str).tolist(), metric_order):
            frame = task_rows[task_rows["metric"].astype(str) == metric]
            parts += ["", f"### {metric_label(metric)}", ""]
            parts.append(section_table(frame, settings, init_order, decimals).rstrip("\n"))
    return "\n".join(parts) + "\n"


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medssl.tables",
        description="Render summary.csv as Markdown tables with bold best and † equivalents.",
    )
    parser.add_argument("--summary", required=True, help="summary.csv from medssl.stats")
    parser.add_argument("--out", required=True, help="Markdown file to write")
    parser.add_argument(
        "--settings",
        type=settings_arg,
        default={},
        help="JSON of the stats section the summary was made with (for the legend)",
    )
    parser.add_argument(
        "--metric-order", type=_split_list, default=None, help="e.g. auc,accuracy,f1"
    )
    parser.add_argument(
        "--init-order", type=_split_list, default=None, help="row order, e.g. scratch,imagenet"
    )
    parser.add_argument(
        "--decimals", type=int, default=None, help="override: 3 for 0-1 metrics, else 2"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    summary = pd.read_csv(args.summary)
    text = markdown_table(
        summary,
        args.settings,
        metric_order=args.metric_order,
        init_order=args.init_order,
        decimals=args.decimals,
    )
    write_text(args.out, text)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
