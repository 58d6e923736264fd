"""Configuration checking: the schema, its defaults, and cross-references.

The workflow calls :func:`validate_config` at parse time, before any job
starts, so a typo stops the run with one message naming the key instead of
failing hours later inside a SLURM job. The JSON schema covers types, ranges
and enums; :func:`check_references` covers what a schema cannot express
(a task naming a dataset that does not exist, and so on).

Run ``python -m medssl.config config.yaml`` to check a file by hand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from medssl.paths import check_outputs

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


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
    problems = list(check_references(config))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid configuration:\n{lines}")
    return config


def check_references(config: dict) -> Iterator[str]:
    """Yield one message per cross-reference the schema cannot check."""
    yield from check_outputs(config)
    datasets = config["data"]["datasets"]
    for name, dataset in datasets.items():
        if dataset["source"] == "dicom":
            folder = Path(dataset["dicom_dir"])
            if not folder.is_dir():
                yield f"data.datasets.{name}.dicom_dir: folder {str(folder)!r} does not exist"
            labels = Path(dataset["labels"])
            if not labels.is_file():
                yield f"data.datasets.{name}.labels: file {str(labels)!r} does not exist"
    for name, task in config["tasks"].items():
        if task["dataset"] not in datasets:
            yield (
                f"tasks.{name}.dataset: {task['dataset']!r} is not a dataset; "
                f"choose one of {sorted(datasets)}"
            )
        split = task["split"]
        if split["val"] + split["test"] >= 1:
            yield f"tasks.{name}.split: val + test must leave patients for training (< 1)"
    pretrain = config["pretrain"]
    if pretrain["dataset"] not in datasets:
        yield (
            f"pretrain.dataset: {pretrain['dataset']!r} is not a dataset; "
            f"choose one of {sorted(datasets)}"
        )
    for name, init in config["inits"].items():
        if init["source"] == "pretrain":
            method = init.get("method", name)
            if method not in pretrain["methods"]:
                yield (
                    f"inits.{name}.method: {method!r} is not pre-trained; "
                    f"pretrain.methods is {pretrain['methods']}"
                )
        elif "method" in init:
            yield f"inits.{name}.method: only an init with source 'pretrain' takes a method"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medssl.config", description="Check a medssl config file."
    )
    parser.add_argument("config", help="config YAML")
    parser.add_argument("overrides", nargs="*", help="further YAML files merged on top")
    parser.add_argument("--print", action="store_true", help="print the resolved config")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    if args.print:
        yaml.safe_dump(config, sys.stdout, sort_keys=False)
    else:
        print(f"{args.config}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
