"""The workflow's settings policy: which jobs exist, what each reads and what it is told.

The rule files only name inputs, outputs and command lines; every decision
about the grid (jobs, seed blocks, path labels), about where a job's inputs
are (the synthetic cohort's own files or the user's) and about which config
keys a job's settings hold lives here, in a :class:`WorkflowPlan` made from
the validated config, so unit tests reach it without running Snakemake.

A job's settings are exactly what its stage reads and nothing else: a changed
value then reruns the jobs that read it (Snakemake's params trigger) and no
others, e.g. a pre-training job sees the shared ``pretrain`` keys and its own
method's sub-section only, so adding a second method does not rerun the first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from medssl.core.task_types import task_type_spec
from medssl.pipeline.codedeps import code_digest
from medssl.pretraining import methods as method_modules


def fraction_label(fraction: float | str) -> str:
    """Path label of a training fraction: 0.1 -> '0.1', 1.0 -> '1'."""
    return format(float(fraction), "g")


def seed_block_label(seeds: list[str]) -> str:
    """Path label of the seeds one fine-tune job runs: ``seed3`` or ``seeds0_1_2``."""
    return f"seed{seeds[0]}" if len(seeds) == 1 else "seeds" + "_".join(seeds)


def as_json(value: Any) -> str:
    """Settings travel to a stage as one sorted JSON string (a rule param)."""
    return json.dumps(value, sort_keys=True)


def encoder_name(config: dict, init: str) -> str | None:
    """The folder ``results/init/<name>/`` holding the encoder ``init`` starts from.

    None for scratch. A plain pre-trained init shares its method's encoder
    (``results/init/<method>``); an imported or continually pre-trained init
    has its own (``results/init/<init>``).
    """
    spec = config["inits"][init]
    if spec["source"] == "scratch":
        return None
    if spec["source"] == "pretrain" and "from" not in spec:
        return spec.get("method", init)
    return init


def pretrain_jobs(config: dict) -> dict[str, dict[str, str | None]]:
    """Every pre-training job by its encoder name: ``{method, from}``.

    One per ``pretrain.methods`` entry (from random weights), plus one per
    init with ``from`` (continual pre-training from that init's encoder).
    """
    jobs: dict[str, dict[str, str | None]] = {
        method: {"method": method, "from": None} for method in config["pretrain"]["methods"]
    }
    for name, spec in config["inits"].items():
        if spec["source"] == "pretrain" and "from" in spec:
            jobs[name] = {"method": spec.get("method", name), "from": spec["from"]}
    return jobs


def import_jobs(config: dict) -> list[str]:
    """Inits read from a published checkpoint (one import job each)."""
    return [name for name, spec in config["inits"].items() if spec["source"] == "import"]


def supervised_jobs(config: dict) -> list[str]:
    """Inits trained with labels on a task (one supervised job each), e.g. ImageNet
    then ChestX-ray14: study B's domain-adaptive initialisations."""
    return [name for name, spec in config["inits"].items() if spec["source"] == "supervised"]


def data_channels(config: dict) -> int:
    """Channels of the converted images: one per HU window, else one."""
    intensity = config["data"]["convert"]["intensity"]
    return len(intensity["windows"]) if intensity["policy"] == "window" else 1


@dataclass(frozen=True)
class SupervisedTask:
    """The task and seed a supervised init trains on."""

    task: str
    seed: str


class WorkflowPlan:
    """Jobs, inputs and settings of one validated config (``config`` as Snakemake holds it)."""

    def __init__(self, config: dict, method_names: list[str]) -> None:
        self.config = config
        self.method_names = list(method_names)
        self.datasets = sorted(config["data"]["datasets"])
        self.tasks = sorted(config["tasks"])
        self.inits = sorted(config["inits"])
        self.pretrain_jobs = pretrain_jobs(config)
        self.methods = sorted(self.pretrain_jobs)
        self.imports = sorted(import_jobs(config))
        self.supervised = sorted(supervised_jobs(config))
        self.fractions = [fraction_label(f) for f in config["fractions"]]
        self.seeds = [str(s) for s in config["seeds"]]
        self.seed_blocks = self._seed_blocks(config["compute"]["seeds_per_job"])
        self.threads = config["compute"]["threads"]

    def _seed_blocks(self, per_job: int) -> dict[str, list[str]]:
        """Consecutive blocks of ``per_job`` seeds by run label: appending seeds adds
        jobs and leaves the existing ones alone."""
        blocks = (self.seeds[i : i + per_job] for i in range(0, len(self.seeds), per_job))
        return {seed_block_label(block): block for block in blocks}

    # --- code ---------------------------------------------------------------

    def code_version(self, stage: str) -> str:
        """Digest of the code ``python -m medssl.<stage>`` runs (a rule param)."""
        return code_digest(stage)

    def pretrain_code_version(self, job: str) -> str:
        """Digest of the pre-training loop plus this job's own method module only."""
        method_module = method_modules.method_module(self.pretrain_method(job))
        return code_digest("pretrain", method_module.removeprefix("medssl."))

    # --- data ---------------------------------------------------------------

    def dataset(self, name: str) -> dict:
        return self.config["data"]["datasets"][name]

    def is_synthetic(self, dataset: str) -> bool:
        return self.dataset(dataset)["source"] == "synthetic"

    def synthetic_settings(self, dataset: str) -> str:
        return as_json(self.dataset(dataset)["synthetic"])

    def convert_settings(self) -> str:
        return as_json(self.config["data"]["convert"])

    def dicom_folder(self, dataset: str) -> str:
        """The DICOM folder a dataset converts from: the synthetic cohort's or the user's."""
        if self.is_synthetic(dataset):
            return f"results/dicom/{dataset}"
        return self.dataset(dataset)["dicom_dir"]

    # --- tasks --------------------------------------------------------------

    def task(self, name: str) -> dict:
        return self.config["tasks"][name]

    def task_dataset_h5(self, task: str) -> str:
        return f"results/data/{self.task(task)['dataset']}.h5"

    def labels_from_masks(self, task: str) -> bool:
        return task_type_spec(self.task(task)["type"]).labels_from_masks

    def task_labels(self, task: str) -> str:
        """The label table of a task; a task whose labels are its masks reads the mask file."""
        if self.labels_from_masks(task):
            return f"results/masks/{task}.h5"
        dataset = self.task(task)["dataset"]
        if self.is_synthetic(dataset):
            return f"results/dicom/{dataset}.labels.csv"
        return self.dataset(dataset)["labels"]

    def task_settings(self, task: str) -> str:
        spec = self.task(task)
        labels_key = self.dataset(spec["dataset"])["labels_key"]
        return as_json({"name": task, "labels_key": labels_key, **spec})

    def task_metric(self, task: str) -> str:
        return self.task(task)["metric"]

    def task_metrics(self) -> str:
        """``task=metric,...``: the metric each task is shown in on the heat maps."""
        return ",".join(f"{task}={self.task_metric(task)}" for task in self.tasks)

    def _mask_task(self, task: str) -> dict:
        if not self.labels_from_masks(task):
            raise ValueError(f"task {task!r} is not a segmentation task")
        return self.task(task)

    def mask_source(self, task: str) -> str:
        """Where a segmentation task's masks are read: the configured path, or the
        synthetic cohort's own mask folder."""
        spec = self._mask_task(task)
        if "path" in spec["masks"]:
            return spec["masks"]["path"]
        return f"results/dicom/{spec['dataset']}.masks"

    def mask_dicom_folder(self, task: str) -> str:
        """The DICOM folder of a segmentation task's dataset (RTSTRUCT geometry)."""
        return self.dicom_folder(self._mask_task(task)["dataset"])

    def mask_format(self, task: str) -> str:
        return self._mask_task(task)["masks"]["format"]

    def mask_structure(self, task: str) -> str:
        return self._mask_task(task)["masks"]["structure"]

    def task_masks(self, task: str) -> list[str]:
        """The mask file a fine-tune of this task reads; none for classification."""
        return [f"results/masks/{task}.h5"] if self.labels_from_masks(task) else []

    # --- pre-training -------------------------------------------------------

    def pretrain_h5(self) -> str:
        return f"results/data/{self.config['pretrain']['dataset']}.h5"

    def pretrain_method(self, job: str) -> str:
        """The method a pre-training job runs (its encoder name for a continual init)."""
        method = self.pretrain_jobs[job]["method"]
        assert method is not None
        return method

    def pretrain_settings(self, job: str) -> str:
        """The shared pre-training keys plus this job's method sub-section only."""
        others = set(self.method_names) - {self.pretrain_method(job)}
        section = self.config["pretrain"]
        return as_json(
            {
                key: value
                for key, value in section.items()
                if key not in others and key not in ("methods", "dataset")
            }
        )

    def encoder_path(self, init: str) -> str | None:
        """``results/init/<name>/encoder.pt`` of an init; None for scratch."""
        name = encoder_name(self.config, init)
        return None if name is None else f"results/init/{name}/encoder.pt"

    def _start_encoder(self, start: str | None) -> list[str]:
        path = None if start is None else self.encoder_path(start)
        return [] if path is None else [path]

    def pretrain_start(self, job: str) -> list[str]:
        """The encoder a continual pre-training job starts from; none from random weights."""
        return self._start_encoder(self.pretrain_jobs[job]["from"])

    # --- imports and supervised inits --------------------------------------

    def import_checkpoint(self, init: str) -> str:
        return self.config["inits"][init]["checkpoint"]

    def import_settings(self, init: str) -> dict[str, Any]:
        """What the import reads from the config (a changed value reruns it)."""
        spec = self.config["inits"][init]
        return {
            "format": spec["format"],
            "backbone": spec["backbone"],
            "stem": spec["stem"],
            "in_channels": data_channels(self.config),
        }

    def supervised_task(self, init: str) -> SupervisedTask:
        spec = self.config["inits"][init]
        return SupervisedTask(task=spec["task"], seed=str(spec["seed"]))

    def supervised_subsets(self, init: str) -> str:
        target = self.supervised_task(init)
        return f"results/splits/{target.task}/seed{target.seed}.csv"

    def supervised_start(self, init: str) -> list[str]:
        """The encoder supervised training starts from; none from random weights."""
        return self._start_encoder(self.config["inits"][init].get("from"))

    # --- fine-tuning and the report -----------------------------------------

    def init_encoder(self, init: str) -> list[str]:
        """Encoder file an init starts from; none for scratch."""
        return self._start_encoder(init)

    def run_subsets(self, task: str, run: str) -> list[str]:
        """The subset-rank files of the seeds a fine-tune job runs, in seed order."""
        return [f"results/splits/{task}/seed{s}.csv" for s in self.seed_blocks[run]]

    def run_seeds(self, run: str) -> str:
        return " ".join(self.seed_blocks[run])

    def finetune_metrics(self) -> list[str]:
        """Every fine-tune job's metrics.json, in grid order."""
        return [
            f"results/finetune/{init}/{task}/frac{fraction}/{run}/metrics.json"
            for init in self.inits
            for task in self.tasks
            for fraction in self.fractions
            for run in self.seed_blocks
        ]

    def stats_settings(self) -> str:
        return as_json(self.config["stats"])

    def final_outputs(self) -> list[str]:
        """What ``all`` builds: every table and figure, and every rejects table."""
        per_task = [
            path
            for task in self.tasks
            for path in (
                f"results/tables/summary_{task}.csv",
                f"results/tables/summary_{task}.tex",
            )
        ]
        return [
            "results/tables/runs.csv",
            "results/tables/summary.csv",
            "results/tables/summary.md",
            "results/tables/label_efficiency.csv",
            *per_task,
            *(f"results/figures/label_efficiency_{task}.png" for task in self.tasks),
            *(f"results/figures/bars_{task}.png" for task in self.tasks),
            *(f"results/figures/heatmap_frac{fraction}.png" for fraction in self.fractions),
            "results/figures/forest.png",
            *(f"results/data/{dataset}.rejects.csv" for dataset in self.datasets),
        ]
