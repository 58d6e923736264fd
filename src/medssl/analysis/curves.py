"""Label-efficiency figures (stage ``plots``): test metric against training fraction, per init.

Study A's claim is about how fast performance falls as labels get scarce, so
the x axis is the training fraction on a log scale (10 % -> 25 % -> 50 % are
near-equal steps) with ticks labelled as percentages. Each init is a line with
a translucent 95 % CI band and CI error bars from ``summary.csv`` (the std
where the CI is undefined): the band shows the trend's uncertainty, the bars
keep each point readable where bands overlap or in greyscale print.

An init keeps one colour, marker and line style in every figure: the style is
indexed by the init's position in the sorted list of all inits of the summary,
not of the task being drawn, so a task that lacks an init does not shift the
colours of the others. Markers and line styles vary too, so figures stay
readable in greyscale print.

Intervals are clipped to the metric's range where it has one
(:data:`medssl.core.directions.METRIC_RANGE`: AUC, Dice, accuracy... in
[0, 1]): a t interval of a few seeds near the ceiling can reach past 1, which
is arithmetic, not a possible value. The axis label says so whenever a
metric has a range ("intervals clipped to [0, 1]").

Outputs are byte-reproducible: Agg backend, fixed ``svg.hashsalt``, no PNG
"Software" text chunk and no PDF creation date.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

from medssl.analysis.tables import fraction_label, metric_label
from medssl.core.directions import metric_range
from medssl.core.files import atomic_path

# No pyplot: figures are plain Figure objects (no global state, no GUI); the
# backend is still pinned so any pyplot use elsewhere in the process is headless.
matplotlib.use("Agg")

PALETTE: tuple[str, ...] = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#000000",
    "#F0E442",
    "#7F7F7F",
    "#8C564B",
)
"""Okabe-Ito colours (colour-blind safe), then grey and brown for more inits."""
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h")
LINESTYLES: tuple[str | tuple, ...] = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
HATCHES: tuple[str, ...] = ("", "//", "..", "xx", "\\\\", "++", "oo", "--", "||")
"""Bar fills, so bars stay distinguishable in greyscale (cycle coprime with the palette's)."""
BAND_ALPHA = 0.15

DODGE_DECADES = 0.012
"""Horizontal offset between neighbouring inits, in decades of the log x axis."""

RC = {
    "svg.hashsalt": "medssl",
    "svg.fonttype": "none",
    "pdf.fonttype": 42,
    "figure.dpi": 100,
    "savefig.dpi": 200,
}
PNG_METADATA = {"Software": None}
PDF_METADATA = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}


@dataclass(frozen=True)
class Style:
    """How one init is drawn in every figure."""

    color: str
    marker: str
    linestyle: str | tuple
    hatch: str


def init_styles(inits: Sequence[str]) -> dict[str, Style]:
    """A style per init, by position in the sorted unique list of ``inits``.

    Marker and line-style cycles have lengths coprime with the palette's, so
    two inits that share a colour (more than 10 inits) still differ in shape.
    """
    names = sorted(set(map(str, inits)))
    return {
        name: Style(
            PALETTE[i % len(PALETTE)],
            MARKERS[i % len(MARKERS)],
            LINESTYLES[i % len(LINESTYLES)],
            HATCHES[i % len(HATCHES)],
        )
        for i, name in enumerate(names)
    }


def interval_columns(frame: pd.DataFrame) -> tuple[str, str]:
    """The combined (seed + test-set) interval where the summary has it, else the seed CI."""
    if "ci_total_low" in frame.columns and np.isfinite(frame["ci_total_low"].to_numpy(float)).any():
        return "ci_total_low", "ci_total_high"
    return "ci_low", "ci_high"


def interval_label(frame: pd.DataFrame, confidence: float) -> str:
    """What the drawn intervals cover, for the axis label."""
    if interval_columns(frame)[0] == "ci_total_low":
        return f"{100 * confidence:g}% CI incl. test-set variance"
    return f"{100 * confidence:g}% CI over seeds"


def clip_interval(
    mean: np.ndarray, low: np.ndarray, high: np.ndarray, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Interval ends clipped to the metric's range (unchanged for an unbounded metric)."""
    bounds = metric_range(metric)
    if bounds is None:
        return low, high
    return np.clip(low, *bounds), np.clip(high, *bounds)


def clipping_note(metric: str) -> str:
    """What the figure says about clipping: '' for an unbounded metric."""
    bounds = metric_range(metric)
    if bounds is None:
        return ""
    return f"intervals clipped to [{bounds[0]:g}, {bounds[1]:g}]"


def _error_bars(frame: pd.DataFrame, metric: str = "") -> np.ndarray:
    """Asymmetric error bars: the CI where defined, else ± std, else none; clipped to the range."""
    mean = frame["mean"].to_numpy(dtype=float)
    low_column, high_column = interval_columns(frame)
    ci_low = frame[low_column].to_numpy(dtype=float)
    ci_high = frame[high_column].to_numpy(dtype=float)
    std = frame["std"].to_numpy(dtype=float)
    no_ci = ~(np.isfinite(ci_low) & np.isfinite(ci_high))
    ends_low = np.where(no_ci, mean - std, ci_low)
    ends_high = np.where(no_ci, mean + std, ci_high)
    ends_low, ends_high = clip_interval(mean, ends_low, ends_high, metric)
    low = np.clip(mean - ends_low, 0.0, None)
    high = np.clip(ends_high - mean, 0.0, None)
    return np.nan_to_num(np.vstack([low, high]), nan=0.0)


def _draw_init(
    ax: Axes, frame: pd.DataFrame, init: str, style: Style, dodge: float, metric: str = ""
) -> None:
    """One init's CI band, error bars and line (the line alone carries the label)."""
    # Dodge inits sideways by a few hundredths of a decade so error bars
    # at the same fraction do not hide each other; ticks stay on the
    # true fractions.
    x = frame["fraction"].to_numpy(dtype=float) * dodge
    y = frame["mean"].to_numpy(dtype=float)
    low, high = _error_bars(frame, metric)
    ax.fill_between(
        x,
        y - low,
        y + high,
        color=style.color,
        alpha=BAND_ALPHA,
        linewidth=0,
        label="_nolegend_",
    )
    # Error bars drawn apart from the line (solid, unlabelled), so that
    # the figure holds exactly one labelled Line2D per init and the
    # legend shows the line's colour, marker and dash pattern.
    ax.errorbar(
        x,
        y,
        yerr=np.vstack([low, high]),
        fmt="none",
        ecolor=style.color,
        elinewidth=1,
        capsize=3,
        label="_nolegend_",
    )
    ax.plot(
        x,
        y,
        label=init,
        color=style.color,
        marker=style.marker,
        linestyle=style.linestyle,
        linewidth=1.5,
        markersize=6,
    )


def _label_axes(
    ax: Axes, fractions: Sequence[float], task: str, metric: str, confidence: float,
    covers: str = "",
) -> None:  # fmt: skip
    """Log x axis ticked at the fractions as percentages, titles and legend."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(fractions))
    ax.xaxis.set_major_formatter(FixedFormatter([fraction_label(f) for f in fractions]))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(fractions) == 1:
        ax.set_xlim(fractions[0] / 1.5, fractions[0] * 1.5)
    ax.set_xlabel("Labelled training data (fraction of training patients, log scale)")
    note = clipping_note(metric)
    covers = covers or f"{100 * confidence:g}% CI"
    ax.set_ylabel(f"Test {metric_label(metric)} (mean, {covers}" + (f";\n{note})" if note else ")"))
    ax.set_title(f"Label efficiency: {task}, {metric_label(metric)}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(title="Initialisation", fontsize="small", frameon=False)


def label_efficiency_figure(
    summary: pd.DataFrame,
    task: str,
    metric: str,
    inits: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> Figure:
    """The label-efficiency plot of one task and metric, as a matplotlib Figure.

    ``inits`` is the full list the colours are indexed by; by default every init
    in ``summary`` (all tasks), which is what keeps colours stable across figures.
    Each drawn line carries the init as its label (``ax.get_lines()`` /
    ``ax.get_legend_handles_labels()``), one line per init. ``confidence`` is
    the stats setting the summary's CIs were computed with; it only labels the axis.
    """
    styles = init_styles(summary["init"].astype(str).tolist() if inits is None else inits)
    rows = summary[(summary["task"].astype(str) == task) & (summary["metric"] == metric)]
    if rows.empty:
        raise ValueError(f"summary has no rows for task={task!r}, metric={metric!r}")
    missing = sorted(set(rows["init"].astype(str)) - set(styles))
    if missing:
        raise ValueError(f"inits {missing} are not in the colour list {sorted(styles)}")
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(6.0, 4.0), layout="constrained")
        ax = fig.add_subplot()
        drawn = sorted(rows["init"].astype(str).unique())
        for k, init in enumerate(drawn):
            frame = rows[rows["init"].astype(str) == init].sort_values("fraction")
            frame = frame[np.isfinite(frame["mean"].to_numpy(dtype=float))]
            if not frame.empty:
                dodge = 10 ** (DODGE_DECADES * (k - (len(drawn) - 1) / 2))
                _draw_init(ax, frame, init, styles[init], dodge, metric)
        fractions = sorted(rows["fraction"].astype(float).unique())
        _label_axes(ax, fractions, task, metric, confidence, interval_label(rows, confidence))
    return fig


def save_figure(fig: Figure, png_path: str | Path) -> tuple[Path, Path]:
    """Write the figure as PNG (given path) and PDF (same stem), atomically and reproducibly."""
    png = Path(png_path)
    pdf = png.with_suffix(".pdf")
    with matplotlib.rc_context(RC):
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format="png", metadata=PNG_METADATA)
        with atomic_path(pdf) as tmp:
            fig.savefig(tmp, format="pdf", metadata=PDF_METADATA)
    return png, pdf
