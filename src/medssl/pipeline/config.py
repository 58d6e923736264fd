"""Configuration checking: the schema, its defaults, and cross-references.

The workflow calls :func:`validate_config` at parse time, before any job
starts, so a typo stops the run with one message naming the key instead of
failing hours later inside a SLURM job. The JSON schema covers types, ranges
and enums; :func:`check_references` covers what a schema cannot express
(a task naming a dataset that does not exist, and so on).

``python -m medssl.config config.yaml`` (:mod:`medssl.config`) checks a file by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from medssl.core.task_types import task_type_spec
from medssl.pipeline.paths import check_outputs

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    """The config JSON schema (YAML on disk)."""
    return yaml.safe_load(Path(path).read_text())


def method_names(schema_path: str | Path = SCHEMA_PATH) -> list[str]:
    """Pre-training methods the schema accepts (kept equal to the registry by a test)."""
    schema = load_schema(schema_path)
    return list(schema["properties"]["pretrain"]["properties"]["methods"]["items"]["enum"])


def backbone_names(schema_path: str | Path = SCHEMA_PATH) -> list[str]:
    """Backbones the schema accepts (kept equal to the registry by a test)."""
    schema = load_schema(schema_path)
    return list(schema["properties"]["pretrain"]["properties"]["backbone"]["enum"])


def _with_defaults(validator_class: type) -> type:
    """A validator class that fills in ``default`` values while it validates.

    jsonschema validates but never fills defaults; this is the extension its
    documentation describes, so that jobs see fully resolved sections.
    """
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema) -> Iterator:
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = _copy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _copy(value: Any) -> Any:
    """Deep copy of plain YAML data, so defaults are never shared between keys."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    """One line: the key, the offending value and what is allowed."""
    key = _key_path(error)
    if error.validator == "enum":
        return f"{key}: {error.instance!r} is not allowed; choose one of {error.validator_value}"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return f"{key}: unknown key(s) {extra}; allowed keys are {allowed}"
    if error.validator == "propertyNames":
        return f"{key}: {error.message}; names use letters, digits, '_' and '-'"
    return f"{key}: {error.message}"


def validate_config(config: dict, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """Check ``config`` in place against the schema, fill defaults, check references.

    Raises :class:`ConfigError` listing every problem found, one per line.
    """
    schema = load_schema(schema_path)
    validator_class = _with_defaults(jsonschema.validators.validator_for(schema))
    validator = validator_class(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n".join(f"  - {_describe(e)}" for e in errors)
        raise ConfigError(f"invalid configuration:\n{lines}")
    problems = list(_check_overrides(config, schema, validator_class))
    problems += list(check_references(config))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid configuration:\n{lines}")
    return config


OVERRIDES = (
    ("data.datasets", ("data", "datasets"), "convert", ("data", "convert")),
    ("tasks", ("tasks",), "finetune", ("finetune",)),
    ("inits", ("inits",), "finetune", ("finetune",)),
)
"""Per-dataset, per-task and per-init sections that replace keys of a shared section:
(where, path to the named entries, override key, path to the shared section)."""


def _check_overrides(config: dict, schema: dict, validator_class: type) -> Iterator[str]:
    """A dataset's ``convert`` and a task's ``finetune`` keys are keys of the shared
    section, and the shared section with them replaced is valid like the section."""
    for where, entries_path, key, shared_path in OVERRIDES:
        shared_schema, shared = schema, config
        for part in shared_path:
            shared_schema = shared_schema["properties"][part]
            shared = shared[part]
        entries = config
        for part in entries_path:
            entries = entries[part]
        allowed = sorted(shared_schema["properties"])
        for name, entry in entries.items():
            override = entry.get(key) or {}
            unknown = sorted(set(override) - set(allowed))
            if unknown:
                yield f"{where}.{name}.{key}: unknown key(s) {unknown}; allowed keys are {allowed}"
                continue
            merged = _copy({**shared, **override})
            # The section's schema with the definitions its $refs point at.
            section = {**shared_schema, "definitions": schema.get("definitions", {})}
            for error in validator_class(section).iter_errors(merged):
                path = ".".join(str(p) for p in error.absolute_path)
                yield f"{where}.{name}.{key}.{path}: {error.message}"


FILE_KEYS = {
    "dicom": (("dicom_dir", "folder"), ("labels", "file")),
    "images": (("root", "folder"), ("manifest", "file")),
    "npz": (("path", "file"),),
    "nifti": (("root", "folder"), ("manifest", "file"), ("labels", "file")),
    "preset": (("root", "folder"),),
}
"""Per dataset source: the keys naming the user's files, and what each must be."""


def _check_dataset_files(name: str, dataset: dict) -> Iterator[str]:
    for key, kind in FILE_KEYS.get(dataset["source"], ()):
        if key not in dataset:
            continue
        path = Path(dataset[key])
        exists = path.is_dir() if kind == "folder" else path.is_file()
        if not exists:
            yield f"data.datasets.{name}.{key}: {kind} {str(path)!r} does not exist"


def check_references(config: dict) -> Iterator[str]:
    """Yield one message per cross-reference the schema cannot check."""
    yield from check_outputs(config)
    datasets = config["data"]["datasets"]
    for name, dataset in datasets.items():
        yield from _check_dataset_files(name, dataset)
    for name, task in config["tasks"].items():
        yield from _check_task(config, name, task)
    pretrain = config["pretrain"]
    if pretrain["dataset"] not in datasets:
        yield (
            f"pretrain.dataset: {pretrain['dataset']!r} is not a dataset; "
            f"choose one of {sorted(datasets)}"
        )
    yield from _check_inits(config)
    yield from _check_input_sizes(config)
    yield from _check_protocols(config)


def _backbones_in_play(config: dict) -> dict[str, str]:
    """Each backbone a fine-tune may build, and where the config names it."""
    out = {config["pretrain"]["backbone"]: "pretrain.backbone"}
    for name, init in config["inits"].items():
        if init["source"] == "import":
            out.setdefault(init["backbone"], f"inits.{name}.backbone")
    return out


def _check_input_sizes(config: dict) -> Iterator[str]:
    """A ViT needs sides that are multiples of its patch, ConvNeXt and Swin of 32: checked
    on every task's slice size (where it is fixed) and SwAV's local crops before any job."""
    from medssl.models.timm_backbones import TIMM_BACKBONES, check_timm_input_size

    timm_names = {b: w for b, w in _backbones_in_play(config).items() if b in TIMM_BACKBONES}
    datasets = config["data"]["datasets"]
    for task_name, task in config["tasks"].items():
        dataset = datasets.get(task["dataset"], {})
        size = {**config["data"].get("convert", {}), **dataset.get("convert", {})}.get("image_size")
        for backbone, where in timm_names.items():
            problem = size and check_timm_input_size(backbone, size, size)
            if problem:
                yield f"{where}: {problem} (image_size of task {task_name!r})"
    pretrain = config["pretrain"]
    backbone = pretrain["backbone"]
    size = config["data"].get("convert", {}).get("image_size")
    if backbone in TIMM_BACKBONES and size and "swav" in pretrain["methods"]:
        local = int(round(size * float(pretrain.get("swav", {}).get("local_size", 96 / 224))))
        problem = check_timm_input_size(backbone, local, local)
        if problem:
            yield f"pretrain.swav.local_size: {problem} (SwAV's local crops)"


def _check_protocols(config: dict) -> Iterator[str]:
    """The knn probe votes on classes: a segmentation task cannot take it."""
    for init_name, init in config["inits"].items():
        for task_name in init.get("tasks") or config["tasks"]:
            task = config["tasks"].get(task_name)
            if task is None:
                yield (
                    f"inits.{init_name}.tasks: {task_name!r} is not a task; "
                    f"choose from {sorted(config['tasks'])}"
                )
                continue
            protocol = {
                **config["finetune"],
                **task.get("finetune", {}),
                **init.get("finetune", {}),
            }["protocol"]
            if protocol == "knn" and task_type_spec(task["type"]).dense:
                yield (
                    f"inits.{init_name} on task {task_name!r}: protocol knn votes on classes; "
                    f"a {task['type']} task needs linear or full (set the init's tasks or "
                    "finetune)"
                )


def _check_task(config: dict, name: str, task: dict) -> Iterator[str]:
    """The cross-references of one task: its dataset, metrics, masks and split."""
    datasets = config["data"]["datasets"]
    if task["dataset"] not in datasets:
        yield (
            f"tasks.{name}.dataset: {task['dataset']!r} is not a dataset; "
            f"choose one of {sorted(datasets)}"
        )
    spec = task_type_spec(task["type"])
    allowed = spec.metrics
    if task["metric"] not in allowed:
        yield f"tasks.{name}.metric: {task['metric']!r} is not a {spec.name} metric {allowed}"
    select = {**config["finetune"], **task.get("finetune", {})}["select_metric"]
    if select not in ("auto", "loss", *allowed):
        yield (
            f"finetune.select_metric: {select!r} is not a metric of task {name!r} "
            f"({spec.name}: {allowed}); use auto"
        )
    dataset = datasets.get(task["dataset"], {})
    source = dataset.get("source")
    yield from _check_task_masks(name, task, dataset)
    if not spec.labels_from_masks and source in ("dicom", "nifti") and "labels" not in dataset:
        yield (
            f"tasks.{name}: a {spec.name} task needs labels; data.datasets."
            f"{task['dataset']}.labels is not set"
        )
    convert = {**config["data"].get("convert", {}), **dataset.get("convert", {})}
    size = convert.get("image_size")
    if spec.dense and size is not None and size % 32:
        yield (
            f"tasks.{name}: the U-Net needs slices a multiple of 32 pixels wide; "
            f"image_size of dataset {task['dataset']!r} is {size}"
        )
    finetune = {**config["finetune"], **task.get("finetune", {})}
    if finetune["tta"] == "ten_crop" and spec.dense:
        yield f"tasks.{name}: tta ten_crop is for classification, the task is {spec.name}"
    split = task["split"]
    if split["source"] == "random" and split["val"] + split["test"] >= 1:
        yield f"tasks.{name}.split: val + test must leave patients for training (< 1)"


def _check_task_masks(name: str, task: dict, dataset: dict) -> Iterator[str]:
    """A segmentation task's masks: a path for the user's own files; the preset mask
    formats only on a preset dataset."""
    masks = task.get("masks")
    if not masks:
        return
    source = dataset.get("source")
    if masks["format"] in ("rle", "preset"):
        if source != "preset":
            yield (
                f"tasks.{name}.masks.format: {masks['format']!r} reads a preset release's "
                f"masks; dataset {task['dataset']!r} has source {source}"
            )
    elif "path" not in masks and source != "synthetic":
        yield f"tasks.{name}.masks.path: required for a dataset of source {source}"


INIT_KEYS = {
    "scratch": {"finetune", "tasks"},
    "pretrain": {"method", "from", "finetune", "tasks"},
    "import": {"checkpoint", "format", "backbone", "stem", "img_size", "finetune", "tasks"},
    "supervised": {"task", "from", "seed", "finetune", "tasks"},
}
"""Keys each init source takes besides ``source`` (``finetune``: its fine-tunes' overrides;
``tasks``: the tasks it is fine-tuned on, default all)."""


def _check_inits(config: dict) -> Iterator[str]:
    from medssl.models.checkpoint_formats import FORMATS  # torch-free at import

    inits = config["inits"]
    methods = config["pretrain"]["methods"]
    for name, init in inits.items():
        source = init["source"]
        for key in sorted(set(init) - {"source"} - INIT_KEYS[source]):
            yield f"inits.{name}.{key}: an init with source {source!r} takes no {key!r}"
        if source == "pretrain":
            method = init.get("method", name)
            if "from" in init:
                yield from _check_from(inits, name)
                if name in methods:
                    yield (
                        f"inits.{name}: continual pre-training writes results/init/{name}/, "
                        f"which pretrain.methods' {name!r} writes too; rename the init"
                    )
            elif method not in methods:
                yield (
                    f"inits.{name}.method: {method!r} is not pre-trained; "
                    f"pretrain.methods is {methods}"
                )
        elif source == "supervised":
            if init["task"] not in config["tasks"]:
                yield (
                    f"inits.{name}.task: {init['task']!r} is not a task; "
                    f"choose one of {sorted(config['tasks'])}"
                )
            if "from" in init:
                yield from _check_from(inits, name)
            if name in methods:
                yield (
                    f"inits.{name}: supervised training writes results/init/{name}/, "
                    f"which pretrain.methods' {name!r} writes too; rename the init"
                )
        elif source == "import":
            checkpoint = Path(init["checkpoint"])
            if not checkpoint.is_file():
                yield f"inits.{name}.checkpoint: file {str(checkpoint)!r} does not exist"
            spec = FORMATS[init["format"]]
            if not spec.releases(init["backbone"]):
                yield (
                    f"inits.{name}.backbone: format {init['format']!r} is released for "
                    f"{list(spec.architectures)}, not {init['backbone']!r}"
                )
            if name in methods:
                yield (
                    f"inits.{name}: an import writes results/init/{name}/, which "
                    f"pretrain.methods' {name!r} writes too; rename the init"
                )


def _check_from(inits: dict, name: str) -> Iterator[str]:
    """``from`` names an init with an encoder, and following ``from`` never loops."""
    start = inits[name]["from"]
    if start not in inits:
        yield f"inits.{name}.from: {start!r} is not an init; choose one of {sorted(inits)}"
        return
    if inits[start]["source"] == "scratch":
        yield (
            f"inits.{name}.from: {start!r} is scratch, which has no encoder; "
            "drop 'from' to pre-train from random weights"
        )
        return
    seen = [name]
    current = start
    while current in inits and "from" in inits[current]:
        if current in seen:
            chain = " -> ".join([*seen, current])
            yield f"inits.{name}.from: continual pre-training loops: {chain}"
            return
        seen.append(current)
        current = inits[current]["from"]


def load_config(path: str | Path, overrides: list[str | Path] = ()) -> dict:
    """Read a YAML config (and override files merged on top) and validate it."""
    config = _read_yaml(path)
    for extra in overrides:
        config = merge(config, _read_yaml(extra))
    return validate_config(config)


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge, as Snakemake merges ``--configfile`` files."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data
