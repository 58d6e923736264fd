# Helpers shared by the rules: config checking, paths, settings and code inputs.
# Nothing here walks folders or reads data at parse time: every SLURM job
# re-parses this file (partial_fingerprint walks only when `partial` is asked for).

import hashlib
import json
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

SRC = Path(workflow.basedir) / "src"
# Jobs and this file import medssl from the checkout being run, so the code
# Snakemake tracks as input is exactly the code that runs.
sys.path.insert(0, str(SRC))

from medssl.pipeline.codedeps import code_digest
from medssl.pipeline.config import (
    data_channels,
    encoder_name,
    import_jobs,
    method_names,
    pretrain_jobs,
    supervised_jobs,
    validate_config,
)

validate_config(config)

# The prefix is formatted like a shell command, hence the doubled braces.
shell.prefix(
    "set -euo pipefail; "
    f"export PYTHONPATH={shlex.quote(str(SRC))}" + "${{PYTHONPATH:+:$PYTHONPATH}}; "
)


def fraction_label(fraction):
    """Path label of a training fraction: 0.1 -> '0.1', 1.0 -> '1'."""
    return format(float(fraction), "g")


DATASETS = sorted(config["data"]["datasets"])
TASKS = sorted(config["tasks"])
INITS = sorted(config["inits"])
# Pre-training jobs by encoder name: every pretrain.methods entry, plus every
# init continuing a method from another init's encoder (`from`).
PRETRAIN_JOBS = pretrain_jobs(config)
METHODS = sorted(PRETRAIN_JOBS)
IMPORTS = sorted(import_jobs(config))
SUPERVISED = sorted(supervised_jobs(config))
METHOD_NAMES = method_names()
FRACTIONS = [fraction_label(f) for f in config["fractions"]]
SEEDS = [str(s) for s in config["seeds"]]


def seed_block_label(seeds):
    """Path label of the seeds one fine-tune job runs: ``seed3`` or ``seeds0_1_2``."""
    return f"seed{seeds[0]}" if len(seeds) == 1 else "seeds" + "_".join(seeds)


# Fine-tune jobs by run label: consecutive blocks of `compute.seeds_per_job`
# seeds, so appending seeds adds jobs and leaves the existing ones alone.
_PER_JOB = config["compute"]["seeds_per_job"]
SEED_BLOCKS = {
    seed_block_label(block): block
    for block in (SEEDS[i : i + _PER_JOB] for i in range(0, len(SEEDS), _PER_JOB))
}
THREADS = config["compute"]["threads"]


def alternatives(names):
    return "|".join(names) if names else "(?!)"


wildcard_constraints:
    dataset=alternatives(DATASETS),
    task=alternatives(TASKS),
    init=alternatives(INITS),
    method=alternatives(METHODS),
    imported=alternatives(IMPORTS),
    supervised=alternatives(SUPERVISED),
    fraction=r"[0-9.e-]+",
    seed=r"[0-9]+",
    run=alternatives(SEED_BLOCKS),


def as_json(value):
    """Settings travel to a stage as one sorted JSON string (a rule param)."""
    return json.dumps(value, sort_keys=True)


def code_version(stage):
    """Digest of the source files ``python -m medssl.<stage>`` runs.

    A rule param, so Snakemake's params trigger reruns a stage whose code
    changed in content (not merely in mtime, as after a ``git checkout``).
    One string per stage instead of ~15 input files per job keeps the DAG of
    a large grid quick to build (docs/decisions.md).
    """
    return code_digest(stage)


# --- data ---------------------------------------------------------------------


def dataset_config(name):
    return config["data"]["datasets"][name]


def synthetic_settings(wildcards):
    return as_json(dataset_config(wildcards.dataset)["synthetic"])


def dicom_folder(wildcards):
    dataset = dataset_config(wildcards.dataset)
    if dataset["source"] == "synthetic":
        return f"results/dicom/{wildcards.dataset}"
    return dataset["dicom_dir"]


def convert_settings(wildcards):
    return as_json(config["data"]["convert"])


def task_config(name):
    return config["tasks"][name]


def task_dataset_h5(wildcards):
    return f"results/data/{task_config(wildcards.task)['dataset']}.h5"


def task_labels(wildcards):
    """The label table of a task; a segmentation task's labels are its mask file."""
    task = task_config(wildcards.task)
    if task["type"] == "segmentation":
        return f"results/masks/{wildcards.task}.h5"
    name = task["dataset"]
    dataset = dataset_config(name)
    if dataset["source"] == "synthetic":
        return f"results/dicom/{name}.labels.csv"
    return dataset["labels"]


def task_settings(wildcards):
    task = task_config(wildcards.task)
    labels_key = dataset_config(task["dataset"])["labels_key"]
    return as_json({"name": wildcards.task, "labels_key": labels_key, **task})


def segmentation_task(wildcards):
    task = task_config(wildcards.task)
    if task["type"] != "segmentation":
        raise ValueError(f"task {wildcards.task!r} is not a segmentation task")
    return task


def mask_source(wildcards):
    """Where a segmentation task's masks are read: the configured path, or the
    synthetic cohort's own mask folder."""
    task = segmentation_task(wildcards)
    if "path" in task["masks"]:
        return task["masks"]["path"]
    return f"results/dicom/{task['dataset']}.masks"


def mask_dicom_folder(wildcards):
    """The DICOM folder of a segmentation task's dataset (RTSTRUCT geometry)."""
    name = segmentation_task(wildcards)["dataset"]
    dataset = dataset_config(name)
    if dataset["source"] == "synthetic":
        return f"results/dicom/{name}"
    return dataset["dicom_dir"]


def mask_format(wildcards):
    return segmentation_task(wildcards)["masks"]["format"]


def mask_structure(wildcards):
    return segmentation_task(wildcards)["masks"]["structure"]


def task_masks(wildcards):
    """The mask file a fine-tune of this task reads; none for classification."""
    if task_config(wildcards.task)["type"] == "segmentation":
        return [f"results/masks/{wildcards.task}.h5"]
    return []


def masks_argument(wildcards, input):
    masks = list(input.masks)
    return f"--masks {shlex.quote(masks[0])}" if masks else ""


# --- pre-training ------------------------------------------------------------


def pretrain_h5(wildcards):
    return f"results/data/{config['pretrain']['dataset']}.h5"


def pretrain_method(wildcards):
    """The method a pre-training job runs (its encoder name for a continual init)."""
    return PRETRAIN_JOBS[wildcards.method]["method"]


def pretrain_settings(wildcards):
    """The shared pre-training keys plus this method's own sub-section only,
    so adding a second method does not rerun the first."""
    section = config["pretrain"]
    others = set(METHOD_NAMES) - {pretrain_method(wildcards)}
    return as_json(
        {
            key: value
            for key, value in section.items()
            if key not in others and key not in ("methods", "dataset")
        }
    )


def encoder_path(init):
    """``results/init/<name>/encoder.pt`` of an init; None for scratch."""
    name = encoder_name(config, init)
    return None if name is None else f"results/init/{name}/encoder.pt"


def pretrain_start(wildcards):
    """The encoder a continual pre-training job starts from; none from random weights."""
    start = PRETRAIN_JOBS[wildcards.method]["from"]
    return [] if start is None else [encoder_path(start)]


def init_encoder_argument(wildcards, input):
    starts = list(input.start)
    return f"--init-encoder {shlex.quote(starts[0])}" if starts else ""


# --- import -------------------------------------------------------------------


def import_config(wildcards):
    return config["inits"][wildcards.imported]


def import_checkpoint(wildcards):
    return import_config(wildcards)["checkpoint"]


def import_settings(wildcards):
    """What the import reads from the config (a changed value reruns it)."""
    spec = import_config(wildcards)
    return {
        "format": spec["format"],
        "backbone": spec["backbone"],
        "stem": spec["stem"],
        "in_channels": data_channels(config),
    }


# --- fine-tuning --------------------------------------------------------------


# --- supervised initialisations -------------------------------------------------


def supervised_wildcards(wildcards):
    """The wildcards of the task a supervised init trains on, for the task helpers."""
    spec = config["inits"][wildcards.supervised]
    return SimpleNamespace(task=spec["task"], seed=str(spec["seed"]))


def supervised_h5(wildcards):
    return task_dataset_h5(supervised_wildcards(wildcards))


def supervised_partition(wildcards):
    return f"results/splits/{supervised_wildcards(wildcards).task}.csv"


def supervised_subsets(wildcards):
    task = supervised_wildcards(wildcards)
    return f"results/splits/{task.task}/seed{task.seed}.csv"


def supervised_masks(wildcards):
    return task_masks(supervised_wildcards(wildcards))


def supervised_task_settings(wildcards):
    return task_settings(supervised_wildcards(wildcards))


def supervised_start(wildcards):
    """The encoder supervised training starts from; none from random weights."""
    start = config["inits"][wildcards.supervised].get("from")
    return [] if start is None else [encoder_path(start)]


def init_encoder(wildcards):
    """Encoder file an init starts from; none for scratch."""
    path = encoder_path(wildcards.init)
    return [] if path is None else [path]


def encoder_argument(wildcards, input):
    encoders = list(input.encoder)
    return f"--encoder {shlex.quote(encoders[0])}" if encoders else ""


def run_subsets(wildcards):
    """The subset-rank files of the seeds a fine-tune job runs, in seed order."""
    return [
        f"results/splits/{wildcards.task}/seed{s}.csv"
        for s in SEED_BLOCKS[wildcards.run]
    ]


def run_seeds(wildcards):
    return " ".join(SEED_BLOCKS[wildcards.run])


def finetune_metrics():
    return expand(
        "results/finetune/{init}/{task}/frac{fraction}/{run}/metrics.json",
        init=INITS,
        task=TASKS,
        fraction=FRACTIONS,
        run=list(SEED_BLOCKS),
    )


# --- report -------------------------------------------------------------------


def stats_settings(wildcards):
    return as_json(config["stats"])


def task_metric(wildcards):
    return task_config(wildcards.task)["metric"]


def task_metrics(wildcards):
    """``task=metric,...``: the metric each task is shown in on the heat maps."""
    return ",".join(f"{task}={task_config(task)['metric']}" for task in TASKS)


def partial_fingerprint(wildcards):
    """Hash of the metrics files that exist now (path, size, mtime).

    The one place that walks a folder, and only when `partial` is requested:
    a changed fingerprint reruns the partial aggregation (params trigger).
    """
    digest = hashlib.sha256()
    for path in sorted(Path("results/finetune").rglob("metrics.json")):
        stat = path.stat()
        digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def final_outputs():
    return [
        "results/tables/runs.csv",
        "results/tables/summary.csv",
        "results/tables/summary.md",
        "results/tables/label_efficiency.csv",
        *expand("results/tables/summary_{task}.{ext}", task=TASKS, ext=("csv", "tex")),
        *expand("results/figures/label_efficiency_{task}.png", task=TASKS),
        *expand("results/figures/bars_{task}.png", task=TASKS),
        *expand("results/figures/heatmap_frac{fraction}.png", fraction=FRACTIONS),
        "results/figures/forest.png",
        *expand("results/data/{dataset}.rejects.csv", dataset=DATASETS),
    ]
