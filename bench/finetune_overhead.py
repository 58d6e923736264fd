"""What one fine-tune job pays besides training, and what running seeds together saves.

Every fine-tune job starts a Python process, imports torch and medssl and
opens its data before the first step. Study B's grid has thousands of runs,
so this fixed cost matters. This benchmark makes a small synthetic cohort,
then measures on it, in one run:

* start-up: ``python -c "import medssl.finetune"`` (interpreter, torch, medssl);
* N seeds as N processes (``compute.seeds_per_job: 1``, what a job per seed
  costs without Snakemake's own overhead);
* the same N seeds in one process (``--seed 0 1 ... N-1``,
  ``compute.seeds_per_job: N``).

The difference per run is the per-job overhead that running seeds together
removes. SLURM grouping (``group-components``) removes the scheduler
round-trip but not this: each grouped job still starts its own process.

    python bench/finetune_overhead.py              # 4 seeds, the default config's fine-tune
    python bench/finetune_overhead.py --seeds 8 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
sys.path.insert(0, str(SRC))

from medssl.core.files import write_csv  # noqa: E402
from medssl.datasets.conversion import convert  # noqa: E402
from medssl.datasets.hdf5 import read_meta  # noqa: E402
from medssl.datasets.splits import make_partition, make_subsets, read_label_table  # noqa: E402
from medssl.datasets.synthetic import synthesize  # noqa: E402


def prepare(root: Path, seeds: int) -> dict:
    """Cohort, conversion, partition and subset files of the default config's region task."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    synthetic = config["data"]["datasets"]["synthct"]["synthetic"]
    synthesize(root / "dicom", root / "labels.csv", synthetic)
    convert(root / "dicom", root / "data.h5", root / "rejects.csv", config["data"]["convert"])
    task = {"name": "region", "labels_key": "sop_uid", **config["tasks"]["region"]}
    labels = read_label_table(root / "labels.csv", "sop_uid", task["column"])
    partition = make_partition(read_meta(root / "data.h5"), labels, task)
    write_csv(root / "partition.csv", partition)
    subsets = []
    for seed in range(seeds):
        path = root / f"seed{seed}.csv"
        write_csv(path, make_subsets(partition, seed=seed))
        subsets.append(path)
    return {"task": task, "settings": config["finetune"], "subsets": subsets}


def command(root: Path, prepared: dict, seeds: list[int], out: Path, epochs: int) -> list[str]:
    settings = {**prepared["settings"], "epochs": epochs}
    argv = [sys.executable, "-m", "medssl.finetune", "--data", str(root / "data.h5")]
    argv += ["--partition", str(root / "partition.csv")]
    argv += ["--subsets", *(str(prepared["subsets"][s]) for s in seeds)]
    argv += ["--fraction", "1.0", "--seed", *(str(s) for s in seeds)]
    argv += ["--task", json.dumps(prepared["task"]), "--settings", json.dumps(settings)]
    argv += ["--init", "scratch", "--backbone", "resnet_small", "--threads", "1"]
    argv += ["--device", "cpu", "--out", str(out)]
    return argv


def timed(argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="runs per comparison")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    args = parser.parse_args(argv)
    epochs = args.epochs or yaml.safe_load((REPO / "config.yaml").read_text())["finetune"]["epochs"]
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="medssl-ft-overhead-") as tmp:
        root = Path(tmp)
        prepared = prepare(root, args.seeds)
        startup = statistics.median(
            timed([sys.executable, "-c", "import medssl.finetune"]) for _ in range(3)
        )
        seeds = list(range(args.seeds))
        apart = sum(
            timed(command(root, prepared, [s], root / f"apart{s}.json", epochs)) for s in seeds
        )
        together = timed(command(root, prepared, seeds, root / "together.json", epochs))
        runs = json.loads((root / "together.json").read_text())
        for seed in seeds:
            alone = json.loads((root / f"apart{seed}.json").read_text())
            if alone["test"] != runs[seed]["test"]:
                sys.exit(f"seed {seed}: one process and its own process disagree")
    n = args.seeds
    saved = (apart - together) / n
    print(f"fine-tune runs: {n} (region task, {epochs} epochs, resnet_small, 1 thread)")
    print("| measure | seconds |")
    print("|---|---:|")
    print(f"| start-up (python + torch + medssl import), median of 3 | {startup:.2f} |")
    print(f"| one process per seed, per run | {apart / n:.2f} |")
    print(f"| all seeds in one process, per run | {together / n:.2f} |")
    print(f"| saved per run | {saved:.2f} ({100 * saved / (apart / n):.0f} %) |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
