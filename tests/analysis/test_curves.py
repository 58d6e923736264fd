"""analysis.curves: one line per init, stable colours, greyscale styles, reproducible bytes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from medssl.analysis.curves import PALETTE, init_styles, label_efficiency_figure
from tests.analysis.frames import curve_summary


def _colours(fig) -> dict[str, str]:
    ax = fig.axes[0]
    handles, labels = ax.get_legend_handles_labels()
    return {label: to_hex(h.get_color()) for h, label in zip(handles, labels, strict=True)}


def test_one_line_per_init_with_labels() -> None:
    fig = label_efficiency_figure(curve_summary(), "nodule", "auc")
    ax = fig.axes[0]
    _, labels = ax.get_legend_handles_labels()
    assert labels == ["byol", "scratch", "simclr"]
    data_lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in data_lines] == ["byol", "scratch", "simclr"]
    assert len(ax.containers) == 3  # one set of error bars per init
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10%", "25%", "50%"]
    assert "nodule" in ax.get_title() and "AUC" in ax.get_title()
    assert "AUC" in ax.get_ylabel() and "95% CI" in ax.get_ylabel()
    other = label_efficiency_figure(curve_summary(), "nodule", "auc", confidence=0.9)
    assert "90% CI" in other.axes[0].get_ylabel()
    assert ax.get_legend() is not None


def test_colours_stable_across_tasks_with_different_init_subsets() -> None:
    summary = curve_summary()
    nodule = _colours(label_efficiency_figure(summary, "nodule", "auc"))
    region = _colours(label_efficiency_figure(summary, "region", "auc"))
    assert set(region) == {"scratch", "simclr"}
    for init in region:
        assert region[init] == nodule[init]
    assert len(set(nodule.values())) == 3
    # Same colours again when drawn twice, and from the explicit style table.
    again = _colours(label_efficiency_figure(summary, "nodule", "auc"))
    assert again == nodule
    styles = init_styles(summary["init"])
    assert nodule["simclr"] == to_hex(styles["simclr"].color)
    assert styles["byol"].color == PALETTE[0]


def test_styles_differ_in_shape_for_greyscale() -> None:
    styles = init_styles([f"init{i:02d}" for i in range(12)])
    pairs = {(s.marker, str(s.linestyle)) for s in styles.values()}
    assert len(pairs) == 12
    # beyond the palette, colours repeat but shapes keep inits apart
    assert styles["init00"].color == styles["init10"].color
    assert styles["init00"].marker != styles["init10"].marker


def test_error_bars_fall_back_to_std() -> None:
    fig = label_efficiency_figure(curve_summary(), "region", "auc")
    ax = fig.axes[0]
    styles = init_styles(curve_summary()["init"])
    (bars,) = [
        c
        for c in ax.containers
        if to_hex(c.lines[2][0].get_color()[0]) == to_hex(styles["scratch"].color)
    ]
    segments = bars.lines[2][0].get_segments()
    half_widths = sorted(round(abs(seg[1][1] - seg[0][1]) / 2, 6) for seg in segments)
    assert half_widths == [0.02, 0.03, 0.03]


def test_unknown_task_is_an_error() -> None:
    with pytest.raises(ValueError, match="no rows"):
        label_efficiency_figure(curve_summary(), "nope", "auc")


def _wild_dice() -> pd.DataFrame:
    """A Dice summary whose t intervals reach from -0.3 to 2.0 (two seeds, big spread)."""
    rows = [
        {"task": "lung", "metric": "dice", "fraction": f, "init": "scratch", "n": 2}
        | {"mean": 0.85, "std": 0.2, "ci_low": -0.3, "ci_high": 2.0}
        for f in (0.1, 0.5)
    ]
    return pd.DataFrame(rows)


def test_intervals_are_clipped_to_the_metric_range_and_the_label_says_so() -> None:
    fig = label_efficiency_figure(_wild_dice(), "lung", "dice")
    ax = fig.axes[0]
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() >= 0.0 and band.max() <= 1.0
    assert np.isclose(band.min(), 0.0) and np.isclose(band.max(), 1.0)
    assert "intervals clipped to [0, 1]" in ax.get_ylabel()
    loss = _wild_dice().assign(metric="loss")
    unclipped = label_efficiency_figure(loss, "lung", "loss").axes[0]
    assert unclipped.collections[0].get_paths()[0].vertices[:, 1].max() == pytest.approx(2.0)
    assert "clipped" not in unclipped.get_ylabel()
