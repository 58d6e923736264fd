"""analysis.figures: drawn numbers come from the tables; the figure registry."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_hex

from medssl.analysis.curves import init_styles
from medssl.analysis.figures import bars_figure, draw_figure, forest_figure, heatmap_figure
from medssl.core.registry import UnknownNameError
from tests.analysis.frames import figure_efficiency, figure_summary


def test_bar_heights_are_the_summary_means_and_stars_are_drawn() -> None:
    summary = figure_summary()
    fig = bars_figure(summary, "nodule", "auc", {"reference": "scratch"})
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    rows = summary[summary["task"] == "nodule"].sort_values(["init", "fraction"])
    np.testing.assert_allclose(heights, rows["mean"])
    assert [t.get_text() for t in ax.texts] == ["*"] * 4
    styles = init_styles(summary["init"])
    _, labels = ax.get_legend_handles_labels()
    assert labels == ["scratch", "simclr", "spark"]
    assert to_hex(ax.patches[0].get_facecolor()) == to_hex(styles["scratch"].color)
    assert ax.patches[0].get_hatch() != ax.patches[2].get_hatch()


def test_heatmap_cells_are_the_summary_means() -> None:
    summary = figure_summary()
    fig = heatmap_figure(summary, 0.5, {"nodule": "auc", "region": "auc"})
    grid = np.asarray(fig.axes[0].images[0].get_array())
    expected = (
        summary[summary["fraction"] == 0.5]
        .pivot(index="init", columns="task", values="mean")
        .to_numpy()
    )
    np.testing.assert_allclose(grid, expected)
    assert len(fig.axes[0].texts) == 6
    with pytest.raises(ValueError, match="fraction"):
        heatmap_figure(summary, 0.25, {"nodule": "auc"})


def test_forest_x_values_are_the_slopes() -> None:
    table = figure_efficiency()
    fig = forest_figure(table, {"reference": "scratch"})
    ax = fig.axes[0]
    plotted = {}
    for container in ax.containers:
        plotted[container.get_label()] = container.lines[0].get_xdata()
    for init, frame in table.groupby("init"):
        np.testing.assert_allclose(plotted[init], frame.sort_values("task")["slope"])
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "nodule (AUC): spark n.s." in labels


def test_figures_are_drawn_by_name_with_the_options_they_need() -> None:
    fig = draw_figure("bars", figure_summary(), {}, task="nodule", metric="auc", fraction=0.5)
    assert len(fig.axes[0].patches) == 6
    with pytest.raises(ValueError, match="figure 'heatmap' needs fraction, metrics"):
        draw_figure("heatmap", figure_summary(), {})
    with pytest.raises(UnknownNameError, match="unknown figure 'forrest'; did you mean 'forest'"):
        draw_figure("forrest", figure_efficiency(), {})


def test_bar_error_bars_are_clipped_to_the_metric_range() -> None:
    summary = figure_summary()
    summary["ci_high"] = summary["mean"] + 0.9
    summary["ci_low"] = summary["mean"] - 0.9
    ax = bars_figure(summary, "nodule", "auc", {}).axes[0]
    segments = np.concatenate(
        [c.get_segments() for c in ax.collections if hasattr(c, "get_segments")]
    )
    ys = segments[:, :, 1]
    assert ys.min() >= 0.0 and ys.max() <= 1.0
    assert "intervals clipped to [0, 1]" in ax.get_ylabel()


def test_forest_axis_names_the_fitting_scale() -> None:
    efficiency = figure_efficiency().assign(scale="logit")
    ax = forest_figure(efficiency, {}).axes[0]
    assert "logit" in ax.get_xlabel()
