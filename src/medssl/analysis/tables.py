"""Markdown, CSV and LaTeX tables of ``summary.csv`` in the style of study B's (stage ``tables``).

One section per task and metric; rows are initialisations, columns training
fractions (as percentages); cells read ``mean ± std`` over the cell's units
(fine-tune seeds, or pre-training-run means where an init has several
pre-training runs) with the same number of decimals throughout a table.

Marks, as the stats stage computed them (this module only renders them):
**bold** is the best mean of a column; ↓ an init shown not to be the best
(multiple comparisons with the best); ≈ an init shown *equivalent* to the
best within the configured margin by a TOST. An unmarked cell is one the data
cannot separate from the best: deliberately no symbol, because the old
"† = not significantly different" was read as "equivalent", which it is not.
Under every table come the difference to the best (and to ``stats.reference``)
with its interval, a legend stating the test, correction, family, alpha and
the design (pre-training runs × fine-tune seeds per init), and the notes of
cells where a test cannot work.

The same tables are written per task as CSV (plain text cells, a ``notes``
column) and LaTeX (booktabs; marks defined in the caption). The three outputs
differ only in a ``Dialect``, so their numbers and marks cannot drift apart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from medssl.analysis.statistics import ONE_PRETRAIN_NOTE, TESTS, metric_direction, resolve_settings
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
        "holm": "Holm-corrected",
        "fdr_bh": "Benjamini-Hochberg FDR-corrected",
        "none": "not corrected for multiple comparisons",
    },
)
"""How the legend names each of :data:`medssl.analysis.statistics.CORRECTIONS`."""
FAMILY_LABELS: Registry[str] = Registry(
    "correction family",
    {
        "cell": "within each column",
        "task": "over every metric and fraction of the task",
        "table": "over every task, metric and fraction of the summary",
    },
)
"""How the legend names each of :data:`medssl.analysis.statistics.FAMILIES`."""
WORSE = "↓"
EQUIVALENT = "≈"
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
    worse: str
    equivalent: str
    stars: Callable[[str], str] | None
    """Renders the stars against the reference; None: not shown in this format."""
    missing: str


DIALECTS: Registry[Dialect] = Registry(
    "table dialect",
    {
        "markdown": Dialect(
            " ± ", lambda t: f"**{t}**", f" {WORSE}", f" {EQUIVALENT}", None, MISSING
        ),
        "csv": Dialect(
            " ± ",
            lambda t: f"{t} (best)",
            f" {WORSE}",
            f" {EQUIVALENT}",
            lambda s: f" {s}",
            MISSING,
        ),
        "latex": Dialect(
            r" $\pm$ ",
            lambda t: rf"\textbf{{{t}}}",
            r"$^{\downarrow}$",
            r"$^{\approx}$",
            lambda s: rf"$^{{{s}}}$",
            "--",
        ),
    },
)
"""Output format -> how it spells a cell."""


def format_cell(
    row: Mapping[str, Any] | None, decimals: int, n_max: int, dialect: str = "markdown"
) -> str:
    """``mean ± std`` with the best bold, ↓ for "shown not best", ≈ for TOST-equivalent, short n."""
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
    elif mark == "worse":
        text += spell.worse
    equivalence = row.get("equivalence")
    if isinstance(equivalence, str) and equivalence:
        text += spell.equivalent
    stars = row.get("stars")
    if spell.stars is not None and isinstance(stars, str) and stars not in ("", "n.s."):
        text += spell.stars(stars)
    n = int(row["n"])
    if n != n_max:
        text += f" (n={n})"
    return text


def _design(frame: pd.DataFrame) -> str:
    """How many pre-training runs and fine-tune seeds each init of a table has."""
    if "n_pretrain" not in frame.columns or "n_seeds" not in frame.columns:
        return "Design not recorded (summary without n_pretrain / n_seeds)."
    parts = []
    for init, rows in frame.groupby(frame["init"].astype(str), sort=True):
        n_pre = int(rows["n_pretrain"].max())
        seeds = int(rows["n_seeds"].max())
        if n_pre == 0:
            parts.append(f"{init}: {seeds} fine-tune seeds, no pre-training run recorded")
        elif n_pre == 1:
            parts.append(f"{init}: 1 pre-training run × {seeds} fine-tune seeds "
                         f"(pre-training variance not measured)")  # fmt: skip
        else:
            parts.append(f"{init}: {n_pre} pre-training runs × {seeds} fine-tune seeds "
                         f"(statistics over pre-training-run means)")  # fmt: skip
    return "Design: " + "; ".join(parts) + "."


def legend(
    settings: Mapping[str, Any] | None,
    direction: str,
    n_max: int,
    frame: pd.DataFrame | None = None,
) -> str:
    """The text under a table: what the numbers and marks mean, by which test, over what."""
    cfg = resolve_settings(settings)
    better = "highest" if direction == "higher" else "lowest"
    family = FAMILY_LABELS[cfg["correction_family"]]
    text = (
        f"Mean ± sample std over the cell's units (up to n = {n_max} runs; n shown where "
        f"fewer runs gave a value); {_coverage(frame)} **Bold**: {better} mean in the column. "
        f"{WORSE}: shown not to be the best (multiple comparisons with the best, "
        f"Bonferroni form of Hsu's MCB, one-sided {TESTS[cfg['test']].label}; "
        f"α = {cfg['alpha']:g}, family: {family}; {_mcb_correction(cfg)}). "
        f"Unmarked: not separated from the best, which is not evidence of equivalence. "
    )
    text += _fallbacks(frame, cfg)
    margin = cfg["equivalence_margin"]
    if margin is None:
        text += "No equivalence test was made (stats.equivalence_margin is null). "
    else:
        text += (
            f"{EQUIVALENT}: equivalent to the best within ±{margin:g} (two one-sided tests, "
            f"{CORRECTION_LABELS[cfg['correction']]} {family}). "
        )
    if frame is not None:
        text += _design(frame)
    return text.rstrip()


def _coverage(frame: pd.DataFrame | None) -> str:
    """What the intervals cover: seeds only, or (summary.csv's ci_total) the test set too."""
    if frame is not None and _has_values(frame, "ci_total_low"):
        return (
            "the std, the tests and the differences' intervals cover seed (and pre-training) "
            "variance; the intervals of the table 'Mean with its interval over seeds and test "
            "patients' add test-set variance (patient-level bootstrap of the test split, "
            "combined with the seed variance)."
        )
    return "intervals cover seed (and pre-training) variance only, not test-set sampling."


def _fallbacks(frame: pd.DataFrame | None, cfg: Mapping[str, Any]) -> str:
    """The legend's word on cells whose comparison could not use the configured test."""
    if frame is None or "notes" not in frame.columns or cfg["test"] == "welch":
        return ""
    notes = frame["notes"].fillna("").astype(str)
    count = int(notes.str.contains("Welch's test").sum())
    if count == 0:
        return ""
    return (
        f"In {count} of {len(frame)} cells some comparisons used Welch's unequal-variance "
        f"t-test instead of the {TESTS[cfg['test']].label} (units that cannot be paired by "
        f"seed: pre-training-run means, or too few shared seeds); the notes name them. "
    )


def _mcb_correction(cfg: Mapping[str, Any]) -> str:
    """How the comparisons with the best are corrected over the inits of the family."""
    return f"{CORRECTION_LABELS[cfg['correction']]} over the inits"


def _total_text(row: Mapping[str, Any] | None, decimals: int, missing: str) -> str:
    """``0.842 [0.801, 0.879]``: the mean with summary.csv's ci_total interval."""
    if row is None or not math.isfinite(float(row["mean"])):
        return missing
    low, high = (float(row.get(c, math.nan)) for c in ("ci_total_low", "ci_total_high"))
    text = f"{float(row['mean']):.{decimals}f}"
    if math.isfinite(low) and math.isfinite(high):
        text += f" [{low:.{decimals}f}, {high:.{decimals}f}]"
    return text


def _diff_text(row: Mapping[str, Any] | None, prefix: str, decimals: int, missing: str) -> str:
    """``+0.012 [-0.003, 0.027]``: a difference with its interval (empty for the other itself)."""
    if row is None:
        return missing
    values = [row.get(f"{prefix}{suffix}") for suffix in ("", "_ci_low", "_ci_high")]
    if values[0] is None or not math.isfinite(float(values[0])):
        return ""
    est, low, high = (float(v) if v is not None else math.nan for v in values)
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{est:+.{decimals}f}"
    return f"{est:+.{decimals}f} [{low:+.{decimals}f}, {high:+.{decimals}f}]"


def _cell_note(note: object) -> str:
    """A cell's warnings without the one-pre-training-run note, which the legend's
    design line states once per init instead of once per cell."""
    if not isinstance(note, str):
        return ""
    return "; ".join(part for part in note.split("; ") if part and part != ONE_PRETRAIN_NOTE)


def cell_notes(frame: pd.DataFrame) -> list[str]:
    """``init, fraction: note`` for every cell of a table whose comparisons carry warnings."""
    if "notes" not in frame.columns:
        return []
    out = []
    for row in frame.sort_values(["init", "fraction"], kind="mergesort").to_dict("records"):
        note = _cell_note(row.get("notes"))
        if note:
            out.append(f"{row['init']}, {fraction_label(row['fraction'])}: {note}")
    return out


def _ordered(values: Sequence[str], order: Sequence[str] | None) -> list[str]:
    """Listed names first in the given order, then the rest sorted; absent ones skipped."""
    present = sorted(set(values))
    if not order:
        return present
    head = [v for v in order if v in present]
    return head + [v for v in present if v not in head]


DIFFERENCES: tuple[tuple[str, str], ...] = (
    ("diff_vs_best", "Difference to the best"),
    ("diff_vs_ref", "Difference to the reference"),
)
"""summary.csv column prefix of a difference, and the heading of its table."""


TOTAL_INTERVAL = "ci_total"
"""Pseudo-prefix of the block "mean with the interval over seeds and test patients"."""


def _has_values(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and bool(np.isfinite(frame[column].to_numpy(dtype=float)).any())


def _differences(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """The interval tables this frame can show (its summary has the columns and values): the
    mean with the combined seed and test-set interval, then the differences."""
    out = []
    if _has_values(frame, "ci_total_low"):
        out.append((TOTAL_INTERVAL, "Mean with its interval over seeds and test patients"))
    for prefix, title in DIFFERENCES:
        if prefix in frame.columns and np.isfinite(frame[prefix].to_numpy(dtype=float)).any():
            if prefix == "diff_vs_ref" and "reference" in frame.columns:
                title += f" ({frame['reference'].dropna().astype(str).iloc[0]})"
            out.append((prefix, title))
    return out


def _markdown_grid(header: list[str], inits: list[str], grid: list[list[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", *(["---:"] * (len(header) - 1))]) + "|",
    ]
    lines += [
        "| " + " | ".join([init, *cells]) + " |" for init, cells in zip(inits, grid, strict=True)
    ]
    return lines


def section_table(
    frame: pd.DataFrame,
    settings: Mapping[str, Any] | None,
    init_order: Sequence[str] | None = None,
    decimals: int | None = None,
) -> str:
    """One Markdown table (rows = inits, columns = fractions), its differences, legend and notes."""
    cfg = resolve_settings(settings)
    fractions, inits, grid, n_max = _cells(frame, init_order, decimals, "markdown")
    header = ["Initialisation", *(fraction_label(f) for f in fractions)]
    lines = _markdown_grid(header, inits, grid)
    for prefix, title in _differences(frame):
        _, _, diffs, _ = _cells(frame, init_order, decimals, "markdown", prefix)
        lines += ["", f"{title}, {100 * cfg['confidence']:g}% CI (this init minus the other):", ""]
        lines += _markdown_grid(header, inits, diffs)
    direction = metric_direction(str(frame["metric"].iloc[0]), cfg.get("directions"))
    lines += ["", legend(cfg, direction, n_max, frame)]
    notes = cell_notes(frame)
    if notes:
        lines += ["", "Notes on the tests (fallbacks, and where a test cannot work):", ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


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
    frame: pd.DataFrame,
    init_order: Sequence[str] | None,
    decimals: int | None,
    dialect: str,
    difference: str | None = None,
) -> tuple[list[float], list[str], list[list[str]], int]:
    """Fractions, inits and formatted cells of one (task, metric) frame.

    ``difference`` (``diff_vs_best`` or ``diff_vs_ref``) formats that
    difference with its interval instead of ``mean ± std``; :data:`TOTAL_INTERVAL`
    the mean with its seed and test-set interval.
    """
    fractions = sorted(frame["fraction"].astype(float).unique())
    inits = _ordered(frame["init"].astype(str).tolist(), init_order)
    if decimals is None:
        decimals = decimals_for(np.concatenate([frame["mean"], frame["std"]]))
    n_max = int(frame["n"].max()) if len(frame) else 0
    cells = {(str(r["init"]), float(r["fraction"])): r for r in frame.to_dict(orient="records")}
    missing = DIALECTS[dialect].missing

    def render(row: Mapping[str, Any] | None) -> str:
        if difference is None:
            return format_cell(row, decimals, n_max, dialect)
        if difference == TOTAL_INTERVAL:
            return _total_text(row, decimals, missing)
        return _diff_text(row, difference, decimals, missing)

    grid = [[render(cells.get((i, f))) for f in fractions] for i in inits]
    return fractions, inits, grid, n_max


def _task_rows(summary: pd.DataFrame, task: str) -> pd.DataFrame:
    rows = summary[summary["task"].astype(str) == task]
    if rows.empty:
        raise ValueError(f"summary has no rows for task {task!r}")
    return rows


def _init_notes(frame: pd.DataFrame, init: str) -> str:
    """``10%: note; 50%: note``: the warnings of one init's cells in a table."""
    if "notes" not in frame.columns:
        return ""
    rows = frame[frame["init"].astype(str) == init].sort_values("fraction")
    return "; ".join(
        f"{fraction_label(f)}: {_cell_note(n)}"
        for f, n in zip(rows["fraction"], rows["notes"], strict=True)
        if _cell_note(n)
    )


def task_csv(
    summary: pd.DataFrame,
    task: str,
    metric_order: Sequence[str] | None = None,
    init_order: Sequence[str] | None = None,
    decimals: int | None = None,
) -> pd.DataFrame:
    """One task's tables as one CSV frame: a row per (metric, quantity, init) and fraction column.

    ``quantity`` is ``mean ± std`` or a difference with its interval; ``notes``
    holds the warnings of the init's cells.
    """
    rows = _task_rows(summary, task)
    parts = []
    for metric in _ordered(rows["metric"].astype(str).tolist(), metric_order):
        frame = rows[rows["metric"].astype(str) == metric]
        quantities = [(None, "mean ± std"), *_differences(frame)]
        for prefix, title in quantities:
            fractions, inits, grid, _ = _cells(frame, init_order, decimals, "csv", prefix)
            table = pd.DataFrame(grid, columns=[fraction_label(f) for f in fractions])
            table.insert(0, "init", inits)
            table.insert(0, "quantity", title)
            table.insert(0, "metric", metric)
            table["notes"] = [_init_notes(frame, init) if prefix is None else "" for init in inits]
            parts.append(table)
    out = pd.concat(parts, ignore_index=True)
    return out[[c for c in out.columns if c != "notes"] + ["notes"]]


def latex_caption(
    settings: Mapping[str, Any] | None,
    task: str,
    metric: str,
    direction: str,
    n_max: int,
    frame: pd.DataFrame | None = None,
) -> str:
    """Caption defining bold, the arrows, the equivalence mark, stars and the design, in LaTeX."""
    cfg = resolve_settings(settings)
    better = "highest" if direction == "higher" else "lowest"
    family = FAMILY_LABELS[cfg["correction_family"]]
    text = (
        f"{latex_escape(task)}: test {latex_escape(metric_label(metric))}, mean $\\pm$ sample "
        f"standard deviation over the cell's units (up to $n = {n_max}$ runs), per fraction "
        f"of labelled training patients; {latex_escape(_coverage(frame))} "
        f"Bold: {better} mean in the column. $^{{\\downarrow}}$: shown "
        f"not to be the best (multiple comparisons with the best, Bonferroni form of Hsu's "
        f"MCB, one-sided {TESTS[cfg['test']].label}, $\\alpha = {cfg['alpha']:g}$, family: "
        f"{family}; {_mcb_correction(cfg)}). "
        f"Unmarked: not separated from the best, which is not equivalence. "
        f"{latex_escape(_fallbacks(frame, cfg))}"
    )
    text = text.rstrip()
    margin = cfg["equivalence_margin"]
    if margin is not None:
        text += (
            f" $^{{\\approx}}$: equivalent to the best within $\\pm{margin:g}$ (two one-sided "
            f"tests, {CORRECTION_LABELS[cfg['correction']]} {family})."
        )
    if cfg["reference"]:
        text += (
            f" Stars: different from {latex_escape(cfg['reference'])} (same test, "
            f"{CORRECTION_LABELS[cfg['correction']]} {family}; $^{{*}}p<0.05$, "
            f"$^{{**}}p<0.01$, $^{{***}}p<0.001$)."
        )
    if frame is not None:
        text += " " + latex_escape(_design(frame))
    return text


def _latex_rows(inits: list[str], grid: list[list[str]]) -> list[str]:
    return [
        " & ".join([latex_escape(init), *cells]) + r" \\"
        for init, cells in zip(inits, grid, strict=True)
    ]


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
        body = _latex_rows(inits, grid)
        for prefix, title in _differences(frame):
            _, _, diffs, _ = _cells(frame, init_order, decimals, "latex", prefix)
            span = len(fractions) + 1
            body += [r"\midrule", rf"\multicolumn{{{span}}}{{l}}{{{latex_escape(title)}}} \\"]
            body += _latex_rows(inits, diffs)
        label = re.sub(r"[^A-Za-z0-9]+", "-", f"{task}-{metric}")
        out += [
            r"\begin{table}[t]",
            r"\centering",
            r"\caption{" + latex_caption(cfg, task, metric, direction, n_max, frame) + "}",
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
