"""Collect every fine-tuning run's ``metrics.json`` into one tidy table (stage ``aggregate``).

``runs.csv`` has one row per run and *test* metric (see docs/architecture.md):
``init, task, task_type, fraction, seed, metric, value, n_train, best_epoch,
pretrain_seed, flags``. ``pretrain_seed`` (the pre-training run a pre-trained
init's encoder came from; empty for scratch and imported inits, and for runs
written before the key existed) lets the statistics nest fine-tune seeds in
pre-training runs; ``flags`` are fine-tuning's degeneracy flags
(``constant_prediction``...) joined with ``;`` (empty when none or absent).
Validation metrics stay in the JSON files: they chose the checkpoint, so
reporting them beside the test numbers would invite selecting on them twice.

The table feeds the statistics, so it is strict about its inputs: a file with
a missing key, a wrong type or an infinite metric stops the stage with an
error naming the file and the key, rather than quietly skewing a mean. An
undefined metric, written as JSON null (a run's AUC is undefined when its test
set holds one class only), is kept as NaN and the statistics count such runs
out of ``n``; a literal NaN or an infinity is refused.

Rows are sorted by (task, metric, init, fraction, seed) and floats are written
with Python's shortest round-trip repr, so two aggregations of the same runs
give byte-identical files whatever order the files arrived in.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medssl.core.files import read_json

COLUMNS: tuple[str, ...] = (
    "init",
    "task",
    "task_type",
    "fraction",
    "seed",
    "metric",
    "value",
    "n_train",
    "best_epoch",
    "pretrain_seed",
    "flags",
)
SORT_KEYS: tuple[str, ...] = ("task", "metric", "init", "fraction", "seed")
"""Row order of runs.csv: groups each (task, metric) block, then the cell keys."""

RUN_KEYS: tuple[str, ...] = ("init", "task", "task_type", "fraction", "seed", "n_train")


class MetricsError(ValueError):
    """A metrics.json that cannot be turned into rows; the message names file and key."""


def _require(payload: dict[str, Any], key: str, path: Path) -> Any:
    if key not in payload:
        raise MetricsError(f"{path}: missing key {key!r}")
    return payload[key]


def _as_int(value: Any, key: str, path: Path, *, allow_none: bool = False) -> int | None:
    """Accept ints (and integral floats, which some JSON writers emit); refuse the rest."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MetricsError(f"{path}: key {key!r} must be an integer, got {value!r}")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise MetricsError(f"{path}: key {key!r} must be an integer, got {value!r}")
    return int(value)


def _as_str(value: Any, key: str, path: Path) -> str:
    if not isinstance(value, str) or not value:
        raise MetricsError(f"{path}: key {key!r} must be a non-empty string, got {value!r}")
    return value


def _as_flags(value: Any, path: Path) -> str:
    """Fine-tuning's degeneracy flags as one ``;``-joined string ('' for none or absent)."""
    if value is None:
        return ""
    if not isinstance(value, list) or not all(
        isinstance(f, str) and f and ";" not in f for f in value
    ):
        raise MetricsError(
            f"{path}: key 'flags' must be a list of non-empty strings without ';', got {value!r}"
        )
    return ";".join(sorted(set(value)))


def _as_metric(value: Any, key: str, path: Path) -> float:
    """A test metric: a finite float, or JSON null (kept as NaN) when undefined.

    A literal NaN is refused: :func:`medssl.core.files.write_json` writes an undefined
    value as null, so NaN in a file means a writer that did not check its
    numbers (a diverged run), and such a run must not enter the tables.
    """
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MetricsError(f"{path}: metric {key!r} must be a number, got {value!r}")
    value = float(value)
    if math.isinf(value):
        raise MetricsError(f"{path}: metric {key!r} is infinite ({value})")
    if math.isnan(value):
        raise MetricsError(
            f"{path}: metric {key!r} is NaN; an undefined metric must be written as null, "
            "a NaN means the run diverged or the file was not written by medssl.finetune"
        )
    return value


def rows_from_metrics(payload: Any, path: str | os.PathLike[str] = "<metrics>") -> list[dict]:
    """Turn one parsed metrics.json into tidy rows, one per test metric.

    Raises :class:`MetricsError` naming ``path`` and the offending key, so a
    broken run in a sweep of thousands is found at once.
    """
    path = Path(path)
    if not isinstance(payload, dict):
        raise MetricsError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    run: dict[str, Any] = {}
    for key in ("init", "task", "task_type"):
        run[key] = _as_str(_require(payload, key, path), key, path)
    fraction = _require(payload, "fraction", path)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not math.isfinite(fraction)
        or not 0 < fraction <= 1
    ):
        raise MetricsError(f"{path}: key 'fraction' must be a number in (0, 1], got {fraction!r}")
    run["fraction"] = float(fraction)
    run["seed"] = _as_int(_require(payload, "seed", path), "seed", path)
    run["n_train"] = _as_int(_require(payload, "n_train", path), "n_train", path)
    # best_epoch may legitimately be null (no epoch ever improved on val);
    # it must still be present so a writer that forgot it is caught.
    run["best_epoch"] = _as_int(
        _require(payload, "best_epoch", path), "best_epoch", path, allow_none=True
    )
    # Keys added after the first runs were written: absent means "not recorded".
    run["pretrain_seed"] = _as_int(
        payload.get("pretrain_seed"), "pretrain_seed", path, allow_none=True
    )
    run["flags"] = _as_flags(payload.get("flags"), path)
    test = _require(payload, "test", path)
    if not isinstance(test, dict) or not test:
        raise MetricsError(f"{path}: key 'test' must be a non-empty object, got {test!r}")
    rows = []
    for metric in sorted(test):
        value = _as_metric(test[metric], f"test.{metric}", path)
        rows.append({**run, "metric": metric, "value": value})
    return rows


def read_metrics(path: str | os.PathLike[str]) -> list[dict]:
    """Read one metrics.json file into tidy rows; errors name the file.

    The file holds one run (a JSON object) or, from a job that ran several
    seeds (``compute.seeds_per_job``), a non-empty list of runs.
    """
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"{path}: file not found")
    payload = read_json(path)
    if not isinstance(payload, list):
        return rows_from_metrics(payload, path)
    if not payload:
        raise MetricsError(f"{path}: an empty list of runs")
    rows = []
    for index, run in enumerate(payload):
        rows.extend(rows_from_metrics(run, f"{path}[{index}]"))
    return rows


def build_runs(paths: Iterable[str | os.PathLike[str]]) -> pd.DataFrame:
    """The tidy runs table of the given metrics.json files, in deterministic order.

    Two files describing the same (init, task, fraction, seed) are an error: the
    statistics would count that run twice.
    """
    rows: list[dict] = []
    origin: dict[tuple, Path] = {}
    for path in sorted({Path(p) for p in paths}):
        file_rows = read_metrics(path)
        # A run has one row per metric, so a repeated (run, metric) pair is a
        # repeated run, whether within one file of several seeds or across files.
        for row in file_rows:
            key = tuple(row[k] for k in ("init", "task", "fraction", "seed"))
            if (key, row["metric"]) in origin:
                raise MetricsError(
                    f"{path}: duplicate run init={key[0]!r} task={key[1]!r} "
                    f"fraction={key[2]!r} seed={key[3]!r}, also in {origin[key, row['metric']]}"
                )
            origin[key, row["metric"]] = path
        rows.extend(file_rows)
    return tidy_frame(rows)


def tidy_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """Rows as a frame with the contract's columns, dtypes and sort order."""
    frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
    frame = frame.astype(
        {
            "init": "str",
            "task": "str",
            "task_type": "str",
            "fraction": "float64",
            "seed": "int64",
            "metric": "str",
            "value": "float64",
            "n_train": "int64",
            # Nullable so an integer column stays integer in the CSV ("4", not "4.0").
            "best_epoch": "Int64",
            "pretrain_seed": "Int64",
            "flags": "str",
        }
    )
    return frame.sort_values(list(SORT_KEYS), kind="mergesort").reset_index(drop=True)


def discover(root: str | os.PathLike[str]) -> list[Path]:
    """Every metrics.json under ``root`` (for looking at a sweep while it runs)."""
    return sorted(Path(root).rglob("metrics.json"))
