"""Markdown, CSV and LaTeX tables of ``summary.csv`` in the style of study B's (stage ``tables``).

One section per task and metric; rows are initialisations, columns training
fractions (as percentages); cells read ``mean ± std`` over seeds with the same
number of decimals throughout a table. The best init of a column is **bold**
and inits not significantly different from it carry a dagger (†). The marks are
taken from ``summary.csv`` as the stats stage computed them; this module only
renders them, and the legend under every table states the test, correction and
alpha (from the same ``stats`` settings) so the table says what it means.

The same tables are written per task as CSV (for spreadsheets; plain text
cells) and LaTeX (booktabs; best in ``\textbf``, equivalents with a
``\\dag`` superscript, both defined in the caption). In CSV and LaTeX a cell
also carries the stars of its test against ``stats.reference`` (none for
n.s.). The three outputs differ only in a ``Dialect``, so their numbers and
marks cannot drift apart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from medssl.analysis.statistics import TESTS, metric_direction, resolve_settings
from medssl.core.registry import Registry

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
"""Display names for metrics; any other metric is shown as written in runs.csv
(a label, not a setting: an unlisted metric is no error)."""

CORRECTION_LABELS: Registry[str] = Registry(
    "correction",
    {
        "holm": "Holm-corrected within each column",
        "fdr_bh": "Benjamini-Hochberg FDR-corrected within each column",
        "none": "not corrected for multiple comparisons",
    },
)
"""How the legend names each of :data:`medssl.analysis.statistics.CORRECTIONS`."""
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


def latex_escape(text: str) -> str:
    """Escape the characters LaTeX treats specially (init names often hold ``_``)."""
    specials = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
    }
    return "".join(specials.get(char, char) for char in text)


@dataclass(frozen=True)
class Dialect:
    """How one output format spells the parts of a cell."""

    pm: str
    bold: Callable[[str], str]
    dagger: str
    stars: Callable[[str], str] | None
    """Renders the stars against the reference; None: not shown in this format."""
    missing: str


DIALECTS: Registry[Dialect] = Registry(
    "table dialect",
    {
        "markdown": Dialect(" ± ", lambda t: f"**{t}**", f" {DAGGER}", None, MISSING),
        "csv": Dialect(" ± ", lambda t: f"{t} (best)", f" {DAGGER}", lambda s: f" {s}", MISSING),
        "latex": Dialect(
            r" $\pm$ ",
            lambda t: rf"\textbf{{{t}}}",
            r"\textsuperscript{\dag}",
            lambda s: rf"$^{{{s}}}$",
            "--",
        ),
    },
)
"""Output format -> how it spells a cell."""


def format_cell(
    row: Mapping[str, Any] | None, decimals: int, n_max: int, dialect: str = "markdown"
) -> str:
    """``mean ± std`` with the best marked, a dagger for equivalents and a short n."""
    spell = DIALECTS[dialect]
    if row is None or not math.isfinite(float(row["mean"])):
        return spell.missing
    text = f"{float(row['mean']):.{decimals}f}"
    std = float(row["std"])
    if math.isfinite(std):
        text += f"{spell.pm}{std:.{decimals}f}"
    mark = row.get("mark")
    if mark == "best":
        text = spell.bold(text)
    elif mark == "equivalent":
        text += spell.dagger
    stars = row.get("stars")
    if spell.stars is not None and isinstance(stars, str) and stars not in ("", "n.s."):
        text += spell.stars(stars)
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
        f"({TESTS[cfg['test']].label}, {CORRECTION_LABELS[cfg['correction']]}, "
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
    fractions, inits, grid, n_max = _cells(frame, init_order, decimals, "markdown")
    header = ["Initialisation", *(fraction_label(f) for f in fractions)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", *(["---:"] * len(fractions))]) + "|",
    ]
    for init, cells in zip(inits, grid, strict=True):
        lines.append("| " + " | ".join([init, *cells]) + " |")
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


def _cells(
    frame: pd.DataFrame, init_order: Sequence[str] | None, decimals: int | None, dialect: str
) -> tuple[list[float], list[str], list[list[str]], int]:
    """Fractions, inits and formatted cells of one (task, metric) frame."""
    fractions = sorted(frame["fraction"].astype(float).unique())
    inits = _ordered(frame["init"].astype(str).tolist(), init_order)
    if decimals is None:
        decimals = decimals_for(np.concatenate([frame["mean"], frame["std"]]))
    n_max = int(frame["n"].max()) if len(frame) else 0
    cells = {(str(r["init"]), float(r["fraction"])): r for r in frame.to_dict(orient="records")}
    grid = [
        [format_cell(cells.get((i, f)), decimals, n_max, dialect) for f in fractions] for i in inits
    ]
    return fractions, inits, grid, n_max


def _task_rows(summary: pd.DataFrame, task: str) -> pd.DataFrame:
    rows = summary[summary["task"].astype(str) == task]
    if rows.empty:
        raise ValueError(f"summary has no rows for task {task!r}")
    return rows


def task_csv(
    summary: pd.DataFrame,
    task: str,
    metric_order: Sequence[str] | None = None,
    init_order: Sequence[str] | None = None,
    decimals: int | None = None,
) -> pd.DataFrame:
    """One task's tables as one CSV frame: a row per (metric, init), a column per fraction."""
    rows = _task_rows(summary, task)
    parts = []
    for metric in _ordered(rows["metric"].astype(str).tolist(), metric_order):
        frame = rows[rows["metric"].astype(str) == metric]
        fractions, inits, grid, _ = _cells(frame, init_order, decimals, "csv")
        table = pd.DataFrame(grid, columns=[fraction_label(f) for f in fractions])
        table.insert(0, "init", inits)
        table.insert(0, "metric", metric)
        parts.append(table)
    return pd.concat(parts, ignore_index=True)


def latex_caption(
    settings: Mapping[str, Any] | None, task: str, metric: str, direction: str, n_max: int
) -> str:
    """Caption defining bold, the dagger and the stars, in LaTeX."""
    cfg = resolve_settings(settings)
    better = "highest" if direction == "higher" else "lowest"
    text = (
        f"{latex_escape(task)}: test {latex_escape(metric_label(metric))}, mean $\\pm$ sample "
        f"standard deviation over $n = {n_max}$ seeds, per fraction of labelled training "
        f"patients. Bold: {better} mean in the column. \\textsuperscript{{\\dag}}: not "
        f"significantly different from the best ({TESTS[cfg['test']].label}, "
        f"{CORRECTION_LABELS[cfg['correction']]}, $\\alpha = {cfg['alpha']:g}$; also where "
        f"no test is possible)."
    )
    if cfg["reference"]:
        text += (
            f" Stars: different from {latex_escape(cfg['reference'])} (same test and "
            f"correction; $^{{*}}p<0.05$, $^{{**}}p<0.01$, $^{{***}}p<0.001$)."
        )
    return text


def task_latex(
    summary: pd.DataFrame,
    task: str,
    settings: Mapping[str, Any] | None = None,
    metric_order: Sequence[str] | None = None,
    init_order: Sequence[str] | None = None,
    decimals: int | None = None,
) -> str:
    """One booktabs ``table`` environment per metric of one task."""
    rows = _task_rows(summary, task)
    cfg = resolve_settings(settings)
    out = [f"% {task}: needs \\usepackage{{booktabs}}"]
    for metric in _ordered(rows["metric"].astype(str).tolist(), metric_order):
        frame = rows[rows["metric"].astype(str) == metric]
        fractions, inits, grid, n_max = _cells(frame, init_order, decimals, "latex")
        direction = metric_direction(metric, cfg.get("directions"))
        header = " & ".join(
            ["Initialisation", *(latex_escape(fraction_label(f)) for f in fractions)]
        )
        body = [
            " & ".join([latex_escape(init), *cells]) + r" \\"
            for init, cells in zip(inits, grid, strict=True)
        ]
        label = re.sub(r"[^A-Za-z0-9]+", "-", f"{task}-{metric}")
        out += [
            r"\begin{table}[t]",
            r"\centering",
            r"\caption{" + latex_caption(cfg, task, metric, direction, n_max) + "}",
            rf"\label{{tab:{label}}}",
            r"\begin{tabular}{l" + "r" * len(fractions) + "}",
            r"\toprule",
            header + r" \\",
            r"\midrule",
            *body,
            r"\bottomrule",
            r"\end{tabular}",
            r"\end{table}",
            "",
        ]
    return "\n".join(out)
