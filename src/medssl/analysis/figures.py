"""The comparison figures beside the label-efficiency curves: bars, heat map, forest plot.

* ``bars``: one task, grouped bars (groups = training fractions, one bar per
  init) of the mean with CI error bars, and the significance stars against
  ``stats.reference`` from ``summary.csv`` above each bar.
* ``heatmap``: one training fraction, mean metric per init (rows) and task
  (columns), each task in its own main metric; values are written in the
  cells and the colour map (cividis) is monotone in lightness, so the figure
  reads in greyscale.
* ``forest``: every task's label-efficiency slope per init with its CI from
  ``label_efficiency.csv``, stars of the slope difference against the
  reference in the label.

Colours, markers and hatches come from ``medssl.analysis.curves.init_styles`` over every
init of the input table, so an init looks the same in every figure. Figures
are chosen by name from ``FIGURES``; each returns a matplotlib Figure, and
the command line saves it as PNG + PDF through ``medssl.analysis.curves.save_figure``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medssl.analysis.curves import RC, init_styles, save_figure
from medssl.analysis.statistics import resolve_settings, settings_arg
from medssl.analysis.tables import fraction_label, metric_label

matplotlib.use("Agg")

log = logging.getLogger(__name__)

HEATMAP_CMAP = "cividis"


def _rows(table: pd.DataFrame, **where: Any) -> pd.DataFrame:
    mask = np.ones(len(table), dtype=bool)
    for key, value in where.items():
        column = table[key]
        mask &= np.isclose(column, value) if key == "fraction" else column.astype(str) == value
    rows = table[mask]
    if rows.empty:
        raise ValueError(f"table has no rows for {where}")
    return rows


def _show_stars(value: Any) -> str:
    """Stars to print above a bar: '' for none and for the reference itself."""
    return value if isinstance(value, str) else ""


def bars_figure(
    summary: pd.DataFrame, task: str, metric: str, settings: Mapping[str, Any] | None = None
) -> Figure:
    """Grouped bars of one task: fractions on x, one bar per init, stars vs the reference.

    Bars carry the init as label; ``ax.patches`` heights are the summary means
    in (fraction, init) order.
    """
    cfg = resolve_settings(settings)
    styles = init_styles(summary["init"].astype(str))
    rows = _rows(summary, task=task, metric=metric)
    fractions = sorted(rows["fraction"].astype(float).unique())
    inits = sorted(rows["init"].astype(str).unique())
    width = 0.8 / len(inits)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(max(5.0, 1.2 * len(fractions) * len(inits) / 2 + 2), 4.0))
        fig.set_layout_engine("constrained")
        ax = fig.add_subplot()
        for k, init in enumerate(inits):
            frame = rows[rows["init"].astype(str) == init].set_index("fraction")
            frame = frame.reindex(fractions)
            mean = frame["mean"].to_numpy(dtype=float)
            x = np.arange(len(fractions)) + (k - (len(inits) - 1) / 2) * width
            err = np.vstack([mean - frame["ci_low"], frame["ci_high"] - mean])
            style = styles[init]
            ax.bar(
                x,
                np.nan_to_num(mean),
                width,
                label=init,
                color=style.color,
                hatch=style.hatch,
                edgecolor="black",
                linewidth=0.6,
                yerr=np.nan_to_num(err),
                capsize=2,
                error_kw={"elinewidth": 0.8},
            )
            marks = frame["stars"] if "stars" in frame.columns else [""] * len(frame)
            for xi, top, mark in zip(x, np.nan_to_num(frame["ci_high"]), marks, strict=True):
                text = _show_stars(mark)
                if text:
                    ax.annotate(
                        text,
                        (xi, top),
                        xytext=(0, 2),
                        textcoords="offset points",
                        ha="center",
                        va="bottom",
                        fontsize="small",
                    )
        ax.set_xticks(np.arange(len(fractions)), [fraction_label(f) for f in fractions])
        # Bars start at zero (a bar's length is its value); the top leaves room
        # for the stars above the error bars.
        tops = rows[["ci_high", "mean"]].to_numpy(dtype=float)
        tops = tops[np.isfinite(tops)]
        if tops.size and tops.max() > 0:
            ax.set_ylim(top=1.12 * float(tops.max()))
        ax.set_xlabel("Labelled training data (fraction of training patients)")
        ax.set_ylabel(f"Test {metric_label(metric)} (mean, {100 * cfg['confidence']:g}% CI)")
        title = f"{task}: {metric_label(metric)} per fraction"
        if cfg["reference"]:
            title += f" (stars: vs {cfg['reference']})"
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(title="Initialisation", fontsize="small", frameon=False, ncols=min(4, len(inits)))
    return fig


def heatmap_figure(
    summary: pd.DataFrame,
    fraction: float,
    metrics: Mapping[str, str],
    settings: Mapping[str, Any] | None = None,
) -> Figure:
    """Mean metric per init (rows) and task (columns) at one fraction.

    ``metrics`` maps each task to the metric shown for it. The image array
    (``ax.images[0].get_array()``) holds exactly the summary means.
    """
    del settings  # same signature as the other figures; nothing to configure
    rows = _rows(summary, fraction=fraction)
    tasks = sorted(t for t in rows["task"].astype(str).unique() if t in metrics)
    if not tasks:
        raise ValueError(f"no task of {sorted(metrics)} has rows at fraction {fraction:g}")
    inits = sorted(summary["init"].astype(str).unique())
    grid = np.full((len(inits), len(tasks)), np.nan)
    for j, task in enumerate(tasks):
        cell = rows[(rows["task"].astype(str) == task) & (rows["metric"] == metrics[task])]
        means = cell.set_index(cell["init"].astype(str))["mean"]
        grid[:, j] = means.reindex(inits).to_numpy(dtype=float)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(2.0 + 1.3 * len(tasks), 1.5 + 0.5 * len(inits)))
        fig.set_layout_engine("constrained")
        ax = fig.add_subplot()
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=HEATMAP_CMAP, aspect="auto")
        ax.set_xticks(range(len(tasks)), [f"{t}\n({metric_label(metrics[t])})" for t in tasks])
        ax.set_yticks(range(len(inits)), inits)
        finite = grid[np.isfinite(grid)]
        middle = float(finite.min() + finite.max()) / 2 if finite.size else 0.0
        for (i, j), value in np.ndenumerate(grid):
            if math.isfinite(value):
                ax.text(
                    j,
                    i,
                    f"{value:.3f}",
                    ha="center",
                    va="center",
                    fontsize="small",
                    color="black" if value > middle else "white",
                )
        ax.set_title(f"Mean test metric at {fraction_label(fraction)} of the labels")
        fig.colorbar(image, ax=ax, label="mean")
    return fig


def forest_figure(efficiency: pd.DataFrame, settings: Mapping[str, Any] | None = None) -> Figure:
    """Slope of metric against log fraction per (task, init), with CI: the robustness plot.

    A smaller slope means less loss per halving of the labels. One labelled
    error-bar container per init; its x data are the table's slopes.
    """
    cfg = resolve_settings(settings)
    table = efficiency[np.isfinite(efficiency["slope"].to_numpy(dtype=float))]
    if table.empty:
        raise ValueError("label-efficiency table has no slopes to plot")
    styles = init_styles(efficiency["init"].astype(str))
    table = table.sort_values(["task", "metric", "init"], kind="mergesort").reset_index(drop=True)
    ylabels = []
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(6.5, 1.2 + 0.35 * len(table)))
        fig.set_layout_engine("constrained")
        ax = fig.add_subplot()
        y = np.arange(len(table))[::-1]
        for init in sorted(table["init"].astype(str).unique()):
            mask = (table["init"].astype(str) == init).to_numpy()
            frame = table[mask]
            slope = frame["slope"].to_numpy(dtype=float)
            err = np.vstack([slope - frame["slope_ci_low"], frame["slope_ci_high"] - slope])
            style = styles[init]
            ax.errorbar(
                slope,
                y[mask],
                xerr=np.nan_to_num(err),
                fmt=style.marker,
                color=style.color,
                capsize=3,
                label=init,
            )
        for row in table.itertuples():
            label = f"{row.task} ({metric_label(str(row.metric))}): {row.init}"
            mark = _show_stars(row.stars)
            ylabels.append(f"{label} {mark}" if mark else label)
        ax.set_yticks(y, ylabels)
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel(
            f"Slope of the metric per unit log fraction ({100 * cfg['confidence']:g}% CI)"
        )
        title = "Label-efficiency slopes"
        if cfg["reference"]:
            title += f"\n(stars: slope differs from {cfg['reference']}'s)"
        ax.set_title(title)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(title="Initialisation", fontsize="small", frameon=False)
    return fig


def _metric_map(text: str) -> dict[str, str]:
    """``task=metric,task=metric`` -> dict, for the heat map's per-task metric."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise argparse.ArgumentTypeError(f"expected task=metric[,task=metric], got {text!r}")
    return {task.strip(): metric.strip() for task, metric in pairs}


FigureMaker = Callable[[pd.DataFrame, argparse.Namespace, Mapping[str, Any]], Figure]

FIGURES: dict[str, FigureMaker] = {
    "bars": lambda table, args, cfg: bars_figure(table, args.task, args.metric, cfg),
    "heatmap": lambda table, args, cfg: heatmap_figure(table, args.fraction, args.metrics, cfg),
    "forest": lambda table, args, cfg: forest_figure(table, cfg),
}
"""Figure name -> how to draw it from the input table and the command-line arguments."""

REQUIRED: dict[str, tuple[str, ...]] = {
    "bars": ("task", "metric"),
    "heatmap": ("fraction", "metrics"),
    "forest": (),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medssl.figures",
        description="Comparison figures (PNG + PDF): grouped bars, heat map, forest plot.",
    )
    parser.add_argument("kind", choices=sorted(FIGURES))
    parser.add_argument(
        "--table", required=True, help="summary.csv (bars, heatmap) or label_efficiency.csv"
    )
    parser.add_argument("--out", required=True, help="PNG path; the PDF gets the same stem")
    parser.add_argument("--task", help="bars: the task")
    parser.add_argument("--metric", help="bars: the metric")
    parser.add_argument("--fraction", type=float, help="heatmap: the training fraction")
    parser.add_argument("--metrics", type=_metric_map, help="heatmap: task=metric,...")
    parser.add_argument("--settings", type=settings_arg, default={}, help="stats section JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    logging.getLogger("fontTools").setLevel(logging.WARNING)
    missing = [f"--{name}" for name in REQUIRED[args.kind] if getattr(args, name) is None]
    if missing:
        parser.error(f"{args.kind} needs {', '.join(missing)}")
    cfg = resolve_settings(args.settings)
    fig = FIGURES[args.kind](pd.read_csv(args.table), args, cfg)
    png, pdf = save_figure(fig, args.out)
    log.info("wrote %s and %s", png, pdf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
