"""Small runs.csv, summary.csv and label_efficiency.csv frames for the analysis tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

# A constructed cell: "good" is clearly best, "close" is within noise of it,
# "bad" is far below; values are fixed so the expectations do not drift.
VALUES = {
    "good": [0.90, 0.91, 0.92, 0.89, 0.93],
    "close": [0.89, 0.92, 0.90, 0.88, 0.91],
    "bad": [0.70, 0.72, 0.69, 0.71, 0.73],
}


def runs_of(values: dict[str, list[float]], task: str = "nodule", fraction: float = 0.5):
    rows = []
    for init, vals in values.items():
        for seed, v in enumerate(vals):
            rows.append(
                {
                    "init": init,
                    "task": task,
                    "task_type": "binary",
                    "fraction": fraction,
                    "seed": seed,
                    "metric": "auc",
                    "value": v,
                    "n_train": 10,
                    "best_epoch": 1,
                }
            )
    return pd.DataFrame(rows)


def table_summary() -> pd.DataFrame:
    rows = [
        # task, metric, fraction, init, n, mean, std, mark
        ("nodule", "auc", 0.1, "scratch", 5, 0.61234, 0.0456, "worse"),
        ("nodule", "auc", 0.1, "simclr", 5, 0.80001, 0.02, "best"),
        ("nodule", "auc", 0.1, "byol", 4, 0.7912, 0.031, "not_separated"),
        ("nodule", "auc", 0.5, "scratch", 5, 0.7, 0.01, "worse"),
        ("nodule", "auc", 0.5, "simclr", 5, 0.85, 0.01, "best"),
        ("nodule", "accuracy", 0.1, "simclr", 5, 0.7, 0.05, "best"),
        ("nodule", "accuracy", 0.1, "scratch", 5, 0.69, 0.05, "not_separated"),
        ("region", "loss", 0.25, "scratch", 3, 1.5, 0.25, "best"),
        ("region", "loss", 0.25, "simclr", 1, 2.5, float("nan"), "not_separated"),
    ]
    frame = pd.DataFrame(
        rows, columns=["task", "metric", "fraction", "init", "n", "mean", "std", "mark"]
    )
    frame["sem"] = frame["ci_low"] = frame["ci_high"] = frame["median"] = float("nan")
    frame["best_init"] = frame["p_not_best"] = frame["p_not_best_adj"] = float("nan")
    return frame


def table_summary_full() -> pd.DataFrame:
    """table_summary with the design, differences, equivalence and notes columns."""
    frame = table_summary()
    frame["n_pretrain"] = [3, 1, 0, 3, 1, 1, 3, 3, 1]
    frame["n_seeds"] = frame["n"]
    frame["diff_vs_best"] = [-0.18766, float("nan"), -0.00881, -0.15, float("nan")] + [
        float("nan")
    ] * 4
    frame["diff_vs_best_ci_low"] = frame["diff_vs_best"] - 0.01
    frame["diff_vs_best_ci_high"] = frame["diff_vs_best"] + 0.01
    frame["equivalence"] = ["", "", "equivalent within ±0.02", "", "", "", "", "", ""]
    frame["notes"] = ["", "", "only 2 unit(s) (seed): intervals and tests are weak"] + [""] * 6
    return frame


def table_summary_with_stars() -> pd.DataFrame:
    frame = table_summary()
    frame["stars"] = ""
    frame.loc[(frame["init"] == "simclr") & (frame["fraction"] == 0.1), "stars"] = "**"
    frame.loc[(frame["init"] == "byol"), "stars"] = "n.s."
    return frame


def curve_summary() -> pd.DataFrame:
    rows = []
    inits = {"nodule": ["byol", "scratch", "simclr"], "region": ["scratch", "simclr"]}
    for task, names in inits.items():
        for i, init in enumerate(names):
            for fraction in (0.1, 0.25, 0.5):
                mean = 0.6 + 0.05 * i + 0.2 * fraction
                # one point with an undefined CI falls back to the std
                ci = np.nan if (init == "scratch" and fraction == 0.1) else 0.03
                rows.append(
                    {
                        "task": task,
                        "metric": "auc",
                        "fraction": fraction,
                        "init": init,
                        "n": 5,
                        "mean": mean,
                        "std": 0.02,
                        "ci_low": mean - ci,
                        "ci_high": mean + ci,
                    }
                )
    return pd.DataFrame(rows)


def figure_summary() -> pd.DataFrame:
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


def figure_efficiency() -> pd.DataFrame:
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
