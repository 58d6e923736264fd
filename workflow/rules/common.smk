# Helpers shared by the rules: config checking, paths, settings and code inputs.
# Nothing here walks folders or reads data at parse time: every SLURM job
# re-parses this file (partial_fingerprint walks only when `partial` is asked for).

import hashlib
import json
import shlex
import sys
from pathlib import Path

SRC = Path(workflow.basedir) / "src"
# Jobs and this file import medssl from the checkout being run, so the code
# Snakemake tracks as input is exactly the code that runs.
sys.path.insert(0, str(SRC))

from medssl.codedeps import module_sources
from medssl.config import method_names, validate_config

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
METHODS = sorted(config["pretrain"]["methods"])
METHOD_NAMES = method_names()
FRACTIONS = [fraction_label(f) for f in config["fractions"]]
SEEDS = [str(s) for s in config["seeds"]]
THREADS = config["compute"]["threads"]


def alternatives(names):
    return "|".join(names) if names else "(?!)"


wildcard_constraints:
    dataset=alternatives(DATASETS),
    task=alternatives(TASKS),
    init=alternatives(INITS),
    method=alternatives(METHODS),
    fraction=r"[0-9.e-]+",
    seed=r"[0-9]+",


def as_json(value):
    """Settings travel to a stage as one sorted JSON string (a rule param)."""
    return json.dumps(value, sort_keys=True)


def code(stage):
    """The source files ``python -m medssl.<stage>`` runs (rerun on edit)."""
    return list(module_sources(stage))


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


def pretrain_settings(wildcards):
    """The shared pre-training keys plus this method's own sub-section only,
    so adding a second method does not rerun the first."""
    section = config["pretrain"]
    others = set(METHOD_NAMES) - {wildcards.method}
    return as_json(
        {
            key: value
            for key, value in section.items()
            if key not in others and key not in ("methods", "dataset")
        }
    )


# --- fine-tuning --------------------------------------------------------------


def init_encoder(wildcards):
    """Encoder file an init starts from; none for scratch."""
    init = config["inits"][wildcards.init]
    if init["source"] == "scratch":
        return []
    return [f"results/init/{init.get('method', wildcards.init)}/encoder.pt"]


def encoder_argument(wildcards, input):
    encoders = list(input.encoder)
    return f"--encoder {shlex.quote(encoders[0])}" if encoders else ""


def finetune_settings(wildcards):
    return as_json(config["finetune"])


def finetune_metrics():
    return expand(
        "results/finetune/{init}/{task}/frac{fraction}/seed{seed}/metrics.json",
        init=INITS,
        task=TASKS,
        fraction=FRACTIONS,
        seed=SEEDS,
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
