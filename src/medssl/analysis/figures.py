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
stage ``figures`` saves it as PNG + PDF through ``medssl.analysis.curves.save_figure``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from medssl.analysis.curves import RC, clip_interval, clipping_note, init_styles
from medssl.analysis.statistics import resolve_settings
from medssl.analysis.tables import fraction_label, metric_label
from medssl.core.registry import Registry

matplotlib.use("Agg")

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
            low, high = clip_interval(
                mean,
                frame["ci_low"].to_numpy(dtype=float),
                frame["ci_high"].to_numpy(dtype=float),
                metric,
            )
            err = np.clip(np.vstack([mean - low, high - mean]), 0.0, None)
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
            _annotate_stars(ax, x, frame.assign(ci_high=high))
        _label_bar_axes(ax, rows, fractions, task, metric, cfg)
        ax.legend(title="Initialisation", fontsize="small", frameon=False, ncols=min(4, len(inits)))
    return fig


def _annotate_stars(ax: Axes, x: np.ndarray, frame: pd.DataFrame) -> None:
    """Each bar's stars against the reference, just above its error bar."""
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


def _label_bar_axes(
    ax: Axes,
    rows: pd.DataFrame,
    fractions: list[float],
    task: str,
    metric: str,
    cfg: Mapping[str, Any],
) -> None:
    """Fraction ticks, a y range from zero with room for the stars, labels and title."""
    ax.set_xticks(np.arange(len(fractions)), [fraction_label(f) for f in fractions])
    # Bars start at zero (a bar's length is its value); the top leaves room
    # for the stars above the error bars.
    tops = rows[["ci_high", "mean"]].to_numpy(dtype=float)
    tops = tops[np.isfinite(tops)]
    if tops.size and tops.max() > 0:
        ax.set_ylim(top=1.12 * float(tops.max()))
    ax.set_xlabel("Labelled training data (fraction of training patients)")
    note = clipping_note(metric)
    ax.set_ylabel(
        f"Test {metric_label(metric)} (mean, {100 * cfg['confidence']:g}% CI"
        + (f";\n{note})" if note else ")")
    )
    title = f"{task}: {metric_label(metric)} per fraction"
    if cfg["reference"]:
        title += f" (stars: vs {cfg['reference']})"
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)


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
        scales = sorted(set(table["scale"].astype(str))) if "scale" in table.columns else ["raw"]
        scale = "logit of the metric" if scales == ["logit"] else "metric"
        if len(scales) > 1:
            scale = "logit (bounded metrics) or raw metric"
        ax.set_xlabel(
            f"Slope of the {scale} per unit log fraction ({100 * cfg['confidence']:g}% CI)"
        )
        title = "Label-efficiency slopes"
        if cfg["reference"]:
            title += f"\n(stars: slope differs from {cfg['reference']}'s)"
        ax.set_title(title)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(title="Initialisation", fontsize="small", frameon=False)
    return fig


@dataclass(frozen=True)
class FigureKind:
    """One figure of the ``figures`` stage: what it needs and how it is drawn."""

    draw: Callable[..., Figure]
    """``draw(table, settings, **options)`` with exactly the ``options`` named in ``needs``."""
    needs: tuple[str, ...]
    """Options besides the table and the stats settings (``task``, ``fraction``...)."""


def _bars(table: pd.DataFrame, settings: Mapping[str, Any], *, task: str, metric: str) -> Figure:
    return bars_figure(table, task, metric, settings)


def _heatmap(
    table: pd.DataFrame, settings: Mapping[str, Any], *, fraction: float, metrics: dict[str, str]
) -> Figure:
    return heatmap_figure(table, fraction, metrics, settings)


FIGURES: Registry[FigureKind] = Registry(
    "figure",
    {
        "bars": FigureKind(_bars, ("task", "metric")),
        "heatmap": FigureKind(_heatmap, ("fraction", "metrics")),
        "forest": FigureKind(forest_figure, ()),
    },
)
"""Figure name -> what it needs and how to draw it."""


def draw_figure(
    kind: str, table: pd.DataFrame, settings: Mapping[str, Any] | None, **options: Any
) -> Figure:
    """The figure ``kind`` of ``table``; ``options`` must give every one it needs."""
    spec = FIGURES[kind]
    missing = [name for name in spec.needs if options.get(name) is None]
    if missing:
        raise ValueError(f"figure {kind!r} needs {', '.join(missing)}")
    cfg = resolve_settings(settings)
    return spec.draw(table, cfg, **{name: options[name] for name in spec.needs})
