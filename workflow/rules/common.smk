# Wildcard constraints and input functions. Every settings decision (jobs, paths,
# what each job is told) is in medssl.pipeline.plan, where unit tests reach it;
# these functions only hand it the wildcards. Nothing here walks folders or reads
# data at parse time: every SLURM job re-parses this file (partial_fingerprint
# walks only when `partial` is asked for).

import hashlib
import shlex
import sys
from pathlib import Path

SRC = Path(workflow.basedir) / "src"
# Jobs and this file import medssl from the checkout being run, so the code
# Snakemake tracks is exactly the code that runs.
sys.path.insert(0, str(SRC))

from medssl.pipeline.config import method_names, validate_config
from medssl.pipeline.plan import WorkflowPlan

validate_config(config)
PLAN = WorkflowPlan(config, method_names())
THREADS = PLAN.threads

# The prefix is formatted like a shell command, hence the doubled braces.
shell.prefix(
    "set -euo pipefail; "
    f"export PYTHONPATH={shlex.quote(str(SRC))}" + "${{PYTHONPATH:+:$PYTHONPATH}}; "
)


def alternatives(names):
    return "|".join(names) if names else "(?!)"


wildcard_constraints:
    dataset=alternatives(PLAN.datasets),
    task=alternatives(PLAN.tasks),
    init=alternatives(PLAN.inits),
    method=alternatives(PLAN.methods),
    imported=alternatives(PLAN.imports),
    supervised=alternatives(PLAN.supervised),
    fraction=r"[0-9.e-]+",
    seed=r"[0-9]+",
    pseed=r"[0-9]+",
    run=alternatives(PLAN.seed_blocks),


def code_version(stage):
    """Digest of the code ``python -m medssl.<stage>`` runs, docstrings and comments
    aside: a rule param, so a change to what runs reruns the stage (not a mere
    mtime change, as after a ``git checkout``). One string per stage instead of
    ~15 input files per job keeps the DAG of a large grid quick to build."""
    return PLAN.code_version(stage)


def option(flag, files):
    """``--flag 'file'`` for an optional single input, nothing without one."""
    files = list(files)
    return f"{flag} {shlex.quote(files[0])}" if files else ""


# --- data ---------------------------------------------------------------------


def synthetic_settings(wildcards):
    return PLAN.synthetic_settings(wildcards.dataset)


def convert_settings(wildcards):
    return PLAN.convert_settings(wildcards.dataset)


def convert_source(wildcards):
    return PLAN.convert_source(wildcards.dataset)


def convert_manifest(wildcards):
    return PLAN.convert_manifest(wildcards.dataset)


def convert_source_options(wildcards):
    return PLAN.convert_source_options(wildcards.dataset)


def manifest_argument(wildcards, input):
    return option("--manifest", input.manifest)


def task_dataset_h5(wildcards):
    return PLAN.task_dataset_h5(wildcards.task)


def task_labels(wildcards):
    return PLAN.task_labels(wildcards.task)


def task_settings(wildcards):
    return PLAN.task_settings(wildcards.task)


def official_splits(wildcards):
    return PLAN.official_splits(wildcards.task)


def official_splits_argument(wildcards, input):
    return option("--official-splits", input.official)


def mask_source(wildcards):
    return PLAN.mask_source(wildcards.task)


def mask_dicom_folder(wildcards):
    return PLAN.mask_dicom_folder(wildcards.task)


def mask_format(wildcards):
    return PLAN.mask_format(wildcards.task)


def mask_structure(wildcards):
    return PLAN.mask_structure(wildcards.task)


def mask_preset_option(wildcards):
    return PLAN.mask_preset_option(wildcards.task)


def task_masks(wildcards):
    return PLAN.task_masks(wildcards.task)


def masks_argument(wildcards, input):
    return option("--masks", input.masks)


# --- pre-training ------------------------------------------------------------


def pretrain_h5(wildcards):
    return PLAN.pretrain_h5()


def pretrain_code_version(wildcards):
    return PLAN.pretrain_code_version(wildcards.method)


def pretrain_method(wildcards):
    return PLAN.pretrain_method(wildcards.method)


def pretrain_settings(wildcards):
    return PLAN.pretrain_settings(wildcards.method)


def pretrain_start(wildcards):
    return PLAN.pretrain_start(wildcards.method, wildcards.pseed)


def init_encoder_argument(wildcards, input):
    return option("--init-encoder", input.start)


# --- imports and supervised initialisations ------------------------------------


def import_checkpoint(wildcards):
    return PLAN.import_checkpoint(wildcards.imported)


def import_settings(wildcards):
    return PLAN.import_settings(wildcards.imported)


def supervised_h5(wildcards):
    return PLAN.task_dataset_h5(PLAN.supervised_task(wildcards.supervised).task)


def supervised_partition(wildcards):
    return f"results/splits/{PLAN.supervised_task(wildcards.supervised).task}.csv"


def supervised_subsets(wildcards):
    return PLAN.supervised_subsets(wildcards.supervised)


def supervised_masks(wildcards):
    return PLAN.task_masks(PLAN.supervised_task(wildcards.supervised).task)


def supervised_task_settings(wildcards):
    return PLAN.task_settings(PLAN.supervised_task(wildcards.supervised).task)


def supervised_seed(wildcards):
    return PLAN.supervised_task(wildcards.supervised).seed


def supervised_start(wildcards):
    return PLAN.supervised_start(wildcards.supervised)


def supervised_encoder_argument(wildcards, input):
    return option("--encoder", input.encoder)


def supervised_finetune_settings(wildcards):
    return PLAN.finetune_settings(PLAN.supervised_task(wildcards.supervised).task)


# --- fine-tuning --------------------------------------------------------------


def init_encoder_files(wildcards):
    return PLAN.init_encoder_files(wildcards.init, wildcards.run)


def encoder_argument(wildcards):
    """``--encoder`` with one file per seed of the job (pre-training runs differ by seed)."""
    encoders = PLAN.init_encoders(wildcards.init, wildcards.run)
    return f"--encoder {' '.join(map(shlex.quote, encoders))}" if encoders else ""


def finetune_settings(wildcards):
    return PLAN.finetune_settings(wildcards.task, wildcards.init)


def run_subsets(wildcards):
    return PLAN.run_subsets(wildcards.task, wildcards.run)


def run_seeds(wildcards):
    return PLAN.run_seeds(wildcards.run)


# --- report -------------------------------------------------------------------


def stats_settings(wildcards):
    return PLAN.stats_settings()


def task_metric(wildcards):
    return PLAN.task_metric(wildcards.task)


def task_metrics(wildcards):
    return PLAN.task_metrics()


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
