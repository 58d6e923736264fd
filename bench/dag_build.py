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

Prints seconds and the peak resident memory of the snakemake process.
"""

from __future__ import annotations

import argparse
import os
import resource
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


def grid_config(scale: int) -> dict:
    """A config with study B's grid shape (seeds times ``scale``).

    Snakemake merges config files key by key, so the default config's inits
    (scratch, simclr) and tasks (nodule, region) stay and count towards the grid.
    """
    inits = {f"init{i:02d}": {"source": "scratch"} for i in range(INITS - 2)}
    columns = [("nodule", "binary"), ("region", "multiclass")]
    tasks = {}
    for t in range(TASKS - 2):
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
    }


def dry_run(workdir: Path, scale: int) -> tuple[float, float, int]:
    """Seconds, peak RSS in MB, and fine-tune jobs of one ``snakemake -n``."""
    (workdir / "grid.yaml").write_text(yaml.safe_dump(grid_config(scale)))
    env = {**os.environ, "PYTHONPATH": str(workdir / "src")}
    command = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--quiet", "rules"]
    command += ["--configfile", "grid.yaml"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"snakemake -n failed:\n{result.stdout}\n{result.stderr}")
    # ru_maxrss of children is the largest child so far (KB on Linux): run one
    # scale per process for exact figures; scales run smallest first here.
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    finetunes = 0
    for line in (result.stdout + result.stderr).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "finetune":
            finetunes = int(parts[1])
    return seconds, peak_mb, finetunes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, nargs="+", default=[1, 10])
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
        print("| grid | fine-tunes | seconds | peak RSS MB |")
        print("|---|---:|---:|---:|")
        for scale in sorted(args.scale):
            seconds, peak_mb, finetunes = dry_run(workdir, scale)
            grid = f"{INITS} x {TASKS} x {len(FRACTIONS)} x {SEEDS * scale}"
            print(f"| {grid} | {finetunes} | {seconds:.1f} | {peak_mb:.0f} |", flush=True)


if __name__ == "__main__":
    main()
