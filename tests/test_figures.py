"""Bars, heat map and forest plot: drawn numbers come from the tables, files are written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from medssl.analysis.figures import bars_figure, forest_figure, heatmap_figure, main
from medssl.analysis.curves import init_styles


def _summary() -> pd.DataFrame:
    rows = []
    for t, task in enumerate(("nodule", "region")):
        for i, init in enumerate(("scratch", "simclr", "spark")):
            for fraction in (0.1, 0.5):
                mean = 0.6 + 0.07 * i + 0.2 * fraction + 0.01 * t
                rows.append(
                    {"task": task, "metric": "auc", "fraction": fraction, "init": init}
                    | {"n": 4, "mean": mean, "std": 0.02, "ci_low": mean - 0.03}
                    | {"ci_high": mean + 0.03, "stars": None if init == "scratch" else "*"}
                )
    return pd.DataFrame(rows)


def _efficiency() -> pd.DataFrame:
    rows = []
    for task in ("nodule", "region"):
        for i, init in enumerate(("scratch", "simclr", "spark")):
            slope = 0.05 - 0.01 * i
            rows.append(
                {"task": task, "metric": "auc", "init": init, "slope": slope}
                | {"slope_ci_low": slope - 0.01, "slope_ci_high": slope + 0.01}
                | {"stars": "" if init == "scratch" else "n.s."}
            )
    return pd.DataFrame(rows)


def test_bar_heights_are_the_summary_means_and_stars_are_drawn() -> None:
    summary = _summary()
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
    summary = _summary()
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
    table = _efficiency()
    fig = forest_figure(table, {"reference": "scratch"})
    ax = fig.axes[0]
    plotted = {}
    for container in ax.containers:
        plotted[container.get_label()] = container.lines[0].get_xdata()
    for init, frame in table.groupby("init"):
        np.testing.assert_allclose(plotted[init], frame.sort_values("task")["slope"])
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "nodule (AUC): spark n.s." in labels


@pytest.mark.parametrize(
    ("kind", "extra", "table"),
    [
        ("bars", ["--task", "region", "--metric", "auc"], "summary"),
        ("heatmap", ["--fraction", "0.1", "--metrics", "nodule=auc,region=auc"], "summary"),
        ("forest", [], "efficiency"),
    ],
)
def test_cli_writes_png_and_pdf(tmp_path: Path, kind: str, extra: list[str], table: str) -> None:
    path = tmp_path / f"{table}.csv"
    (_summary() if table == "summary" else _efficiency()).to_csv(path, index=False)
    out = tmp_path / f"{kind}.png"
    assert main([kind, "--table", str(path), "--out", str(out), *extra]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 1000
    assert out.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"


def test_cli_names_missing_arguments(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["bars", "--table", "x.csv", "--out", str(tmp_path / "b.png")])
