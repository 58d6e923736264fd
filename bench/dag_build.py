"""How long ``snakemake -n`` takes to build the DAG of study B's grid, and 10x it.

Study B fine-tunes 22 initialisations on 7 tasks at 5 training fractions with
10 seeds: 7,700 fine-tunes. Its data cannot ship, so this writes a config of
the same shape on the built-in synthetic dataset (the default config's
scratch and SimCLR inits plus 20 scratch-like ones; its two tasks plus 5 more
on the same two label columns) into a temporary copy of the workflow, and
times a dry run of it. ``--scale 10``
multiplies the seeds by ten (77,000 fine-tunes). Every SLURM job re-parses the
Snakefile, and the submitting Snakemake builds this DAG once per start.

    python bench/dag_build.py                # study B's grid and 10x
    python bench/dag_build.py --scale 1      # study B's grid only
    python bench/dag_build.py --seeds-per-job 10

Each grid is built with one seed per fine-tune job and with 10
(``compute.seeds_per_job``). Prints wall and CPU seconds, the peak resident
memory of the snakemake process and the number of jobs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
COPIED = ("Snakefile", "config.yaml", "workflow", "src", "envs")
INITS, TASKS, FRACTIONS, SEEDS = 22, 7, [0.01, 0.05, 0.1, 0.25, 1.0], 10


def grid_config(scale: int, seeds_per_job: int) -> dict:
    """A config with study B's grid shape (seeds times ``scale``).

    Snakemake merges config files key by key, so the default config's inits
    and tasks stay and count towards the grid.
    """
    default = yaml.safe_load((REPO / "config.yaml").read_text())
    extra_inits = INITS - len(default["inits"])
    inits = {f"init{i:02d}": {"source": "scratch"} for i in range(extra_inits)}
    columns = [("nodule", "binary"), ("region", "multiclass")]
    tasks = {}
    for t in range(TASKS - len(default["tasks"])):
        column, kind = columns[t % 2]
        tasks[f"task{t}"] = {
            "dataset": "synthct",
            "column": column,
            "type": kind,
            "metric": "auc",
            "split": {"val": 0.2, "test": 0.2, "seed": t + 1},
        }
    return {
        "tasks": tasks,
        "inits": inits,
        "fractions": FRACTIONS,
        "seeds": list(range(SEEDS * scale)),
        "compute": {"seeds_per_job": seeds_per_job},
    }


def dry_run(workdir: Path, scale: int, seeds_per_job: int) -> dict[str, float]:
    """Wall and CPU seconds, peak RSS (MB) and job counts of one ``snakemake -n``."""
    (workdir / "grid.yaml").write_text(yaml.safe_dump(grid_config(scale, seeds_per_job)))
    env = {**os.environ, "PYTHONPATH": str(workdir / "src")}
    command = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--quiet", "rules"]
    command += ["--configfile", "grid.yaml"]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=log)
        # wait4 gives this child's own usage (peak RSS, CPU), not the maximum
        # over every child so far as RUSAGE_CHILDREN would.
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"snakemake -n failed:\n{output}")
    counts = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("finetune", "total") and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return {
        "seconds": seconds,
        "cpu": usage.ru_utime + usage.ru_stime,
        "peak_mb": usage.ru_maxrss / 1024,
        "finetune_jobs": counts.get("finetune", 0),
        "jobs": counts.get("total", 0),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, nargs="+", default=[1, 10])
    parser.add_argument(
        "--seeds-per-job",
        type=int,
        nargs="+",
        default=[1, 10],
        help="values of compute.seeds_per_job to compare",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medssl-dag-") as tmp:
        workdir = Path(tmp)
        for name in COPIED:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(
                    source, workdir / name, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(source, workdir / name)
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        print("| grid | runs | seeds per job | jobs | wall s | CPU s | peak RSS MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for scale in sorted(args.scale):
            for per_job in args.seeds_per_job:
                r = dry_run(workdir, scale, per_job)
                grid = f"{INITS} x {TASKS} x {len(FRACTIONS)} x {SEEDS * scale}"
                runs = INITS * TASKS * len(FRACTIONS) * SEEDS * scale
                print(
                    f"| {grid} | {runs} | {per_job} | {r['jobs']} | {r['seconds']:.1f}"
                    f" | {r['cpu']:.1f} | {r['peak_mb']:.0f} |",
                    flush=True,
                )
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
