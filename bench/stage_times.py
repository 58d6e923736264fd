"""Per-stage time and memory of a finished workflow run, from Snakemake's benchmark files.

Every rule writes ``benchmarks/<stage>/...tsv`` (Snakemake's ``benchmark:``
directive: wall seconds, max RSS). This script sums them per stage and prints
a table, plus each stage's share of the total job time, so a change can be
compared with the run before it.

    python bench/stage_times.py [--root .] [--wall SECONDS]

``--wall`` (the measured wall time of the whole ``snakemake`` command) adds the
ratio of summed job time to wall time: the parallelism actually achieved.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def stage_table(root: Path) -> pd.DataFrame:
    rows = []
    for tsv in sorted((root / "benchmarks").rglob("*.tsv")):
        stage = tsv.relative_to(root / "benchmarks").parts[0]
        frame = pd.read_csv(tsv, sep="\t")
        rows.append(
            {
                "stage": stage,
                "s": float(frame["s"].iloc[-1]),
                "max_rss_mb": frame["max_rss"].iloc[-1],
            }
        )
    if not rows:
        raise SystemExit(f"no benchmark files under {root / 'benchmarks'}; run the workflow first")
    jobs = pd.DataFrame(rows)
    jobs["max_rss_mb"] = pd.to_numeric(jobs["max_rss_mb"], errors="coerce")
    table = jobs.groupby("stage").agg(
        jobs=("s", "size"),
        total_s=("s", "sum"),
        mean_s=("s", "mean"),
        max_s=("s", "max"),
        max_rss_mb=("max_rss_mb", "max"),
    )
    table["share"] = table["total_s"] / table["total_s"].sum()
    return table.sort_values("total_s", ascending=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="workflow directory")
    parser.add_argument("--wall", type=float, help="wall seconds of the whole run")
    args = parser.parse_args()
    table = stage_table(args.root)
    with pd.option_context("display.float_format", "{:.2f}".format, "display.width", 120):
        print(table.to_string())
    total = table["total_s"].sum()
    print(f"\nsummed job time: {total:.1f} s over {int(table['jobs'].sum())} jobs")
    if args.wall:
        print(f"wall time: {args.wall:.1f} s; job time / wall time = {total / args.wall:.2f}")


if __name__ == "__main__":
    main()
