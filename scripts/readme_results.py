"""Copy the default run's figures and summary into README.md (run after ``make run``).

The README shows what ``make run`` produces, so it must be what the run produced:
this script copies ``results/figures/label_efficiency_<task>.png`` to
``docs/images/`` and replaces the block between the markers
``<!-- default-run:start -->`` and ``<!-- default-run:end -->`` with each task's
primary metric (mean ± std, from ``results/tables/summary.csv``) per init and
fraction, bold for the best mean, ↓ where an init is shown not to be the best.

    python scripts/readme_results.py [--results results] [--readme README.md]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- default-run:start -->", "<!-- default-run:end -->"


def fraction_label(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def task_table(summary: pd.DataFrame, task: str, metric: str) -> list[str]:
    """One Markdown table: inits down, fractions across, ``mean ± std`` per cell."""
    rows = summary[(summary["task"] == task) & (summary["metric"] == metric)]
    fractions = sorted(rows["fraction"].unique())
    lines = [
        f"| {task} ({metric}) | " + " | ".join(fraction_label(f) for f in fractions) + " |",
        "|:---|" + "---:|" * len(fractions),
    ]
    for init in sorted(rows["init"].unique()):
        cells = []
        for fraction in fractions:
            row = rows[(rows["init"] == init) & (rows["fraction"] == fraction)].iloc[0]
            text = f"{row['mean']:.3f} ± {row['std']:.3f}"
            if row["mark"] == "best":
                text = f"**{text}**"
            elif row["mark"] == "worse":
                text += " ↓"
            cells.append(text)
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    return lines


def block(summary: pd.DataFrame, tasks: dict[str, str], figures: list[str]) -> str:
    parts = [START, ""]
    for task, metric in tasks.items():
        parts += [*task_table(summary, task, metric), ""]
    parts += [f"![label efficiency, {Path(f).stem}]({f})" for f in figures]
    return "\n".join([*parts, "", END])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--config", type=Path, default=REPO / "config.yaml")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    tasks = {name: task.get("metric") or ("dice" if task["type"] == "segmentation" else "auc")
             for name, task in config["tasks"].items()}  # fmt: skip
    summary = pd.read_csv(args.results / "tables" / "summary.csv")
    images = args.readme.parent / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    figures = []
    for task in tasks:
        source = args.results / "figures" / f"label_efficiency_{task}.png"
        shutil.copyfile(source, images / source.name)
        figures.append(f"docs/images/{source.name}")
    text = args.readme.read_text()
    if START not in text or END not in text:
        print(f"{args.readme}: no {START} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    args.readme.write_text(head + block(summary, tasks, figures) + tail)
    print(f"updated {args.readme} and {len(figures)} figures in {images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
