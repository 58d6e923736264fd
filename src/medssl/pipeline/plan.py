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
import shlex
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
    """The folder ``results/init/<name>/`` holding the encoder(s) ``init`` starts from.

    None for scratch. A plain pre-trained init shares its method's encoders
    (``results/init/<method>/pseed<s>``); an imported or continually pre-trained
    init has its own (``results/init/<init>``).
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


def stores_pixels(spec: dict) -> bool:
    """Whether a dataset holds photographs or radiographs as 8/16-bit pixels (an images or
    npz source, or a preset releasing those) rather than CT in HU."""
    if spec["source"] == "preset":
        from medssl.datasets.presets import look_up_preset  # only for preset datasets

        return look_up_preset(spec["preset"]).kind in IMAGE_SOURCES
    return spec["source"] in IMAGE_SOURCES


def dataset_convert_settings(config: dict, dataset: str) -> dict:
    """``data.convert`` with the dataset's own ``convert`` keys replacing it, key by key.

    A dataset of stored pixels takes the ``scale`` intensity policy unless it sets
    its own: the shared section's CT windows mean nothing for a PNG.
    """
    spec = config["data"]["datasets"][dataset]
    override = dict(spec.get("convert", {}))
    if "intensity" not in override and stores_pixels(spec):
        override["intensity"] = {"policy": "scale"}
    return {**config["data"]["convert"], **override}


def data_channels(config: dict, dataset: str | None = None) -> int:
    """Channels of a dataset's converted images (default: the pre-training pool's):
    one per HU window of a CT source, three for colour images kept as RGB, else one."""
    dataset = config["pretrain"]["dataset"] if dataset is None else dataset
    settings = dataset_convert_settings(config, dataset)
    if stores_pixels(config["data"]["datasets"][dataset]):
        return 3 if settings.get("rgb") == "keep" else 1
    intensity = settings["intensity"]
    return len(intensity["windows"]) if intensity["policy"] == "window" else 1


IMAGE_SOURCES = ("images", "npz")
"""Sources of photographs/radiographs rather than HU: no CT intensity policy applies."""

CONVERTED_LABELS = ("images", "npz", "preset")
"""Sources whose label table the conversion writes (results/data/<dataset>.labels.csv)."""


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
        self.pretrain_seeds = [str(s) for s in config["pretrain"]["seeds"]]
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

    def convert_settings(self, dataset: str) -> str:
        return as_json(dataset_convert_settings(self.config, dataset))

    def convert_source(self, dataset: str) -> str:
        """What the conversion reads: the synthetic cohort's DICOM folder, the user's
        DICOM or image folder, the archive, or the release's root folder."""
        spec = self.dataset(dataset)
        source = spec["source"]
        if source == "synthetic":
            return f"results/dicom/{dataset}"
        if source == "dicom":
            return spec["dicom_dir"]
        if source == "npz":
            return spec["path"]
        return spec["root"]

    def convert_manifest(self, dataset: str) -> list[str]:
        """The manifest CSV of an images (or nifti) dataset; a rule input, so an edit reruns."""
        manifest = self.dataset(dataset).get("manifest")
        return [] if manifest is None else [manifest]

    def convert_source_options(self, dataset: str) -> str:
        """``--source``/``--preset`` options of the conversion (the manifest is an input)."""
        spec = self.dataset(dataset)
        source = spec["source"]
        if source == "preset":
            options = as_json(spec["preset_options"])
            return f"--preset {spec['preset']} --preset-options {shlex.quote(options)}"
        return f"--source {'dicom' if source == 'synthetic' else source}"

    def dicom_folder(self, dataset: str) -> str:
        """The folder a dataset's mask sources sit beside (RTSTRUCT and SEG geometry)."""
        return self.convert_source(dataset)

    def dataset_labels(self, dataset: str) -> str | None:
        """The label table of a dataset: the synthetic cohort's, the user's, or the one
        the conversion writes; None for a DICOM or NIfTI folder without labels."""
        spec = self.dataset(dataset)
        if spec["source"] == "synthetic":
            return f"results/dicom/{dataset}.labels.csv"
        if spec["source"] in CONVERTED_LABELS:
            return f"results/data/{dataset}.labels.csv"
        return spec.get("labels")

    def labels_key(self, dataset: str) -> str:
        """The metadata column the label table is keyed by (image id for converted tables)."""
        spec = self.dataset(dataset)
        return "sop_uid" if spec["source"] in CONVERTED_LABELS else spec["labels_key"]

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
        labels = self.dataset_labels(dataset)
        if labels is None:  # refused by the config check; kept for direct callers
            raise ValueError(f"task {task!r}: dataset {dataset!r} has no label table")
        return labels

    def task_settings(self, task: str) -> str:
        """The task's own keys (without its fine-tune overrides, which only fine-tunes
        read: a changed recipe must not rerun the split)."""
        spec = {key: value for key, value in self.task(task).items() if key != "finetune"}
        labels_key = self.labels_key(spec["dataset"])
        return as_json({"name": task, "labels_key": labels_key, **spec})

    def official_splits(self, task: str) -> list[str]:
        """The label table holding the release's split, for a segmentation task (whose
        labels are its masks) with ``split: {source: official}``; none otherwise."""
        spec = self.task(task)
        if spec["split"]["source"] != "official" or not self.labels_from_masks(task):
            return []
        labels = self.dataset_labels(spec["dataset"])
        return [] if labels is None else [labels]

    def finetune_settings(self, task: str, init: str | None = None) -> str:
        """The finetune section with this task's, then this init's overrides replacing it,
        key by key."""
        init_override = self.config["inits"][init].get("finetune", {}) if init else {}
        task_override = self.task(task).get("finetune", {})
        return as_json({**self.config["finetune"], **task_override, **init_override})

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
        """Where a segmentation task's masks are read: the configured path, the synthetic
        cohort's own mask folder, or a preset release's root folder."""
        spec = self._mask_task(task)
        if "path" in spec["masks"]:
            return spec["masks"]["path"]
        if self.is_synthetic(spec["dataset"]):
            return f"results/dicom/{spec['dataset']}.masks"
        return self.convert_source(spec["dataset"])

    def mask_preset_option(self, task: str) -> str:
        """``--preset NAME`` for the mask formats a preset reads (rle, preset); else nothing."""
        spec = self._mask_task(task)
        if spec["masks"]["format"] not in ("rle", "preset"):
            return ""
        return f"--preset {self.dataset(spec['dataset'])['preset']}"

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
                if key not in others and key not in ("methods", "dataset", "seeds")
            }
        )

    def is_pretrained(self, init: str) -> bool:
        """Whether an init's encoder comes from pre-training jobs (one per pre-training seed)."""
        return self.config["inits"][init]["source"] == "pretrain"

    def pretrain_seed_of(self, seed: str) -> str:
        """The pre-training run a fine-tune seed starts from: the k-th of ``seeds`` uses run
        k modulo the number of runs, so appending seeds never moves an existing one."""
        return self.pretrain_seeds[self.seeds.index(seed) % len(self.pretrain_seeds)]

    def encoder_path(self, init: str, pretrain_seed: str | None = None) -> str | None:
        """The encoder file of an init (of its run ``pretrain_seed`` when it is pre-trained,
        the first run by default); None for scratch."""
        name = encoder_name(self.config, init)
        if name is None:
            return None
        if not self.is_pretrained(init):
            return f"results/init/{name}/encoder.pt"
        pretrain_seed = self.pretrain_seeds[0] if pretrain_seed is None else pretrain_seed
        return f"results/init/{name}/pseed{pretrain_seed}/encoder.pt"

    def _start_encoder(self, start: str | None, pretrain_seed: str | None = None) -> list[str]:
        path = None if start is None else self.encoder_path(start, pretrain_seed)
        return [] if path is None else [path]

    def pretrain_start(self, job: str, pretrain_seed: str) -> list[str]:
        """The encoder a continual pre-training run starts from (the same run of a
        pre-trained parent, the one file of an import); none from random weights."""
        return self._start_encoder(self.pretrain_jobs[job]["from"], pretrain_seed)

    # --- imports and supervised inits --------------------------------------

    def import_checkpoint(self, init: str) -> str:
        return self.config["inits"][init]["checkpoint"]

    def import_settings(self, init: str) -> dict[str, Any]:
        """What the import reads from the config (a changed value reruns it)."""
        spec = self.config["inits"][init]
        img_size = spec.get("img_size") or self.config["data"]["convert"].get("image_size")
        if str(spec["backbone"]).startswith("resnet"):
            img_size = None  # a ResNet has no position table: nothing to resample
        return {
            "format": spec["format"],
            "backbone": spec["backbone"],
            "stem": spec["stem"],
            "in_channels": data_channels(self.config),
            # A transformer's position tables are resampled to this size at import.
            "img_size_option": f"--img-size {int(img_size)}" if img_size else "",
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

    def init_encoders(self, init: str, run: str) -> list[str]:
        """The encoder each seed of a fine-tune job starts from, in seed order; none for
        scratch, one file for all seeds of an imported or supervised init."""
        if encoder_name(self.config, init) is None:
            return []
        if not self.is_pretrained(init):
            return self._start_encoder(init)
        return [
            str(self.encoder_path(init, self.pretrain_seed_of(seed)))
            for seed in self.seed_blocks[run]
        ]

    def init_encoder_files(self, init: str, run: str) -> list[str]:
        """The distinct encoder files of a fine-tune job (its rule inputs)."""
        return sorted(set(self.init_encoders(init, run)))

    def run_subsets(self, task: str, run: str) -> list[str]:
        """The subset-rank files of the seeds a fine-tune job runs, in seed order."""
        return [f"results/splits/{task}/seed{s}.csv" for s in self.seed_blocks[run]]

    def run_seeds(self, run: str) -> str:
        return " ".join(self.seed_blocks[run])

    def init_tasks(self, init: str) -> list[str]:
        """The tasks an init is fine-tuned on: its own ``tasks`` list, else every task."""
        chosen = self.config["inits"][init].get("tasks")
        return [task for task in self.tasks if chosen is None or task in chosen]

    def finetune_metrics(self) -> list[str]:
        """Every fine-tune job's metrics.json, in grid order."""
        return [
            f"results/finetune/{init}/{task}/frac{fraction}/{run}/metrics.json"
            for init in self.inits
            for task in self.init_tasks(init)
            for fraction in self.fractions
            for run in self.seed_blocks
        ]

    def training_benchmarks(self) -> list[str]:
        """The benchmark file of every job that makes an encoder or fine-tunes one: what
        the cost table reads (Snakemake writes each when its job ends)."""
        # Only the pre-training runs some fine-tune seed starts from are jobs at all.
        used = [
            p for p in self.pretrain_seeds if p in {self.pretrain_seed_of(s) for s in self.seeds}
        ]
        making = [
            *(
                f"benchmarks/pretrain/{job}/pseed{seed}.tsv"
                for job in self.methods
                for seed in used
            ),
            *(f"benchmarks/import_init/{name}.tsv" for name in self.imports),
            *(f"benchmarks/supervised_init/{name}.tsv" for name in self.supervised),
        ]
        tuning = [
            path.replace("results/finetune/", "benchmarks/finetune/", 1).replace(
                "/metrics.json", ".tsv"
            )
            for path in self.finetune_metrics()
        ]
        return making + tuning

    def encoder_files(self) -> list[str]:
        """Every encoder the fine-tunes start from (inputs of the cost table: its
        benchmark files exist once they do)."""
        return sorted(
            {
                path
                for init in self.inits
                for run in self.seed_blocks
                for path in self.init_encoders(init, run)
            }
        )

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
            "results/tables/costs.csv",
            "results/tables/costs.md",
            *per_task,
            *(f"results/figures/label_efficiency_{task}.png" for task in self.tasks),
            *(f"results/figures/bars_{task}.png" for task in self.tasks),
            *(f"results/figures/heatmap_frac{fraction}.png" for fraction in self.fractions),
            "results/figures/forest.png",
            *(f"results/data/{dataset}.rejects.csv" for dataset in self.datasets),
        ]
