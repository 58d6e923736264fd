"""Compute cost per initialisation, from the workflow's Snakemake benchmark files.

A table of scores says which initialisation is best; a reader choosing one
also needs what it cost. Every training rule writes a benchmark file
(``benchmark:``; columns ``s``, ``h:m:s``, ``max_rss``, ... one row per
repeat) whose path names the run:

* ``benchmarks/pretrain/<init>/pseed<s>.tsv`` (one per pre-training run,
  summed), ``benchmarks/import_init/<init>.tsv``,
  ``benchmarks/supervised_init/<init>.tsv``: making the init's encoder;
* ``benchmarks/finetune/<init>/<task>/frac<f>/<run>.tsv``: one fine-tune job.

Seconds become GPU-hours only when the run's device was a GPU, read from the
run's own record: a fine-tune's ``metrics.json`` provenance (``device``), the
encoder sidecar's ``device`` (and ``world_size``) for pre-training, else the
workflow's device setting passed by the caller. A CPU run reports "CPU", not
0 GPU-hours, so that a cheap CPU job is never read as free GPU time.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

INIT_RULES = ("pretrain", "import_init", "supervised_init")
"""Rules whose benchmark file is the making of one init (``<rule>/<init>.tsv``)."""

FINETUNE_RULE = "finetune"

COLUMNS: tuple[str, ...] = (
    "init",
    "task",
    "init_rule",
    "init_device",
    "init_s",
    "init_gpu_h",
    "finetune_device",
    "finetune_jobs",
    "finetune_s",
    "finetune_s_per_job",
    "finetune_gpu_h",
    "finetune_max_rss_mb",
)
"""The cost table's columns: one row per (init, task); ``task`` "all" sums an init's tasks."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark file: which run it timed and what it measured."""

    path: Path
    rule: str
    init: str
    task: str | None
    fraction: str | None
    run: str | None
    seconds: float
    max_rss_mb: float


def read_benchmark_seconds(path: Path) -> tuple[float, float]:
    """Mean wall seconds and max RSS (MB) over the file's repeats; clear error if malformed."""
    try:
        frame = pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a Snakemake benchmark TSV ({err})") from err
    if "s" not in frame.columns:
        raise ValueError(
            f"{path}: no 's' column (columns: {list(frame.columns)}); "
            "expected a Snakemake benchmark file"
        )
    if frame.empty:
        raise ValueError(f"{path}: benchmark file has no rows")
    seconds = pd.to_numeric(frame["s"], errors="coerce")
    if seconds.isna().any() or (seconds < 0).any():
        raise ValueError(
            f"{path}: column 's' holds a value that is not seconds: {list(frame['s'])}"
        )
    rss = pd.to_numeric(frame.get("max_rss", pd.Series(dtype=float)), errors="coerce")
    return float(seconds.mean()), float(rss.max()) if rss.notna().any() else math.nan


def classify(path: Path, root: Path) -> Benchmark | None:
    """The run ``path`` (under ``root``, the ``benchmarks`` folder) timed; None for other rules."""
    try:
        parts = path.relative_to(root).parts
    except ValueError as err:
        raise ValueError(f"{path} is not under the benchmarks folder {root}") from err
    rule = parts[0]
    if rule == "pretrain" and len(parts) == 3 and parts[2].startswith("pseed"):
        seconds, rss = read_benchmark_seconds(path)
        return Benchmark(path, rule, parts[1], None, None, Path(parts[2]).stem, seconds, rss)
    if rule in INIT_RULES and len(parts) == 2:
        seconds, rss = read_benchmark_seconds(path)
        return Benchmark(path, rule, Path(parts[1]).stem, None, None, None, seconds, rss)
    if rule == FINETUNE_RULE and len(parts) == 5 and parts[3].startswith("frac"):
        seconds, rss = read_benchmark_seconds(path)
        init, task, fraction, run = parts[1], parts[2], parts[3][4:], Path(parts[4]).stem
        return Benchmark(path, rule, init, task, fraction, run, seconds, rss)
    if rule in (*INIT_RULES, FINETUNE_RULE):
        raise ValueError(f"{path}: a {rule} benchmark file at an unexpected path {parts}")
    return None


def find_benchmarks(paths: Iterable[str | Path]) -> list[Benchmark]:
    """The training runs timed by ``paths``: benchmark files, or folders searched for them.

    A folder is a ``benchmarks`` root (``benchmarks/<rule>/...``) or a folder
    holding one; a file's rule is read from its path below the nearest
    ``benchmarks`` folder.
    """
    found: list[Benchmark] = []
    for given in map(Path, paths):
        if given.is_dir():
            root = given if given.name == "benchmarks" else given / "benchmarks"
            if not root.is_dir():
                raise ValueError(f"{given}: neither a benchmarks folder nor one holding it")
            files = sorted(root.rglob("*.tsv"))
        elif given.is_file():
            root = next((p for p in given.parents if p.name == "benchmarks"), None)
            if root is None:
                raise ValueError(f"{given}: not below a 'benchmarks' folder; cannot tell its rule")
            files = [given]
        else:
            raise ValueError(f"{given}: no such file or folder")
        found += [b for b in (classify(f, root) for f in files) if b is not None]
    return found


def device_kind(device: str | None) -> str:
    """ "GPU", "CPU" or "unknown" from a torch device string (``cuda:0``, ``cpu``, ``auto``)."""
    if not device:
        return "unknown"
    text = str(device).lower()
    if text.startswith("cuda"):
        return "GPU"
    if text.startswith("cpu"):
        return "CPU"
    return "unknown"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the run's record ({err})") from err


def run_device(record: Any) -> str | None:
    """The device a metrics.json (one run or a list of runs) or encoder sidecar names."""
    if isinstance(record, list):
        record = record[0] if record else {}
    if not isinstance(record, Mapping):
        return None
    if record.get("device"):
        return str(record["device"])
    settings = (record.get("provenance") or {}).get("settings") or {}
    value = settings.get("device") if isinstance(settings, Mapping) else None
    return None if value is None else str(value)


def benchmark_device(bench: Benchmark, results: Path | None) -> tuple[str | None, int]:
    """(device, number of devices) of the run, from its record under ``results``."""
    if results is None:
        return None, 1
    if bench.rule == FINETUNE_RULE:
        record = results / "finetune" / bench.init / bench.task / f"frac{bench.fraction}"
        path = record / str(bench.run) / "metrics.json"
    elif bench.rule == "supervised_init":
        path = results / "init" / bench.init / "metrics.json"
    elif bench.rule == "pretrain" and bench.run is not None:
        path = results / "init" / bench.init / bench.run / "encoder.json"
    else:
        path = results / "init" / bench.init / "encoder.json"
    if not path.exists():
        return None, 1
    record = _read_json(path)
    world = record.get("world_size", 1) if isinstance(record, Mapping) else 1
    return run_device(record), int(world or 1)


def gpu_hours(seconds: float, kind: str, devices: int = 1) -> float:
    """Seconds x devices in hours on a GPU; NaN otherwise (shown as the device kind)."""
    return seconds * devices / 3600 if kind == "GPU" else math.nan


def _one_kind(kinds: Iterable[str]) -> str:
    values = sorted(set(kinds))
    return values[0] if len(values) == 1 else "mixed" if values else "unknown"


def cost_table(
    benchmarks: list[Benchmark], results: Path | None = None, default_device: str | None = None
) -> pd.DataFrame:
    """One row per (init, task) and one per init with task "all" (see :data:`COLUMNS`).

    ``results`` is the workflow's ``results/`` folder (for each run's device);
    ``default_device`` is used for a run whose record names none.
    """
    if not benchmarks:
        raise ValueError("no pretrain, import_init, supervised_init or finetune benchmark files")
    rows = []
    for bench in benchmarks:
        device, devices = benchmark_device(bench, results)
        kind = device_kind(device or default_device)
        rows.append(
            {
                "rule": bench.rule,
                "init": bench.init,
                "task": bench.task,
                "s": bench.seconds,
                "rss": bench.max_rss_mb,
                "kind": kind,
                "gpu_h": gpu_hours(bench.seconds, kind, devices),
            }
        )
    frame = pd.DataFrame(rows)
    making = frame[frame["rule"].isin(INIT_RULES)].set_index("init")
    tuning = frame[frame["rule"] == FINETUNE_RULE]
    table = []
    for init in sorted(set(frame["init"])):
        made = making.loc[[init]] if init in making.index else None
        own = tuning[tuning["init"] == init]
        for task in [*sorted(set(own["task"])), "all"]:
            runs = own if task == "all" else own[own["task"] == task]
            table.append(_row(init, task, made, runs))
    return pd.DataFrame(table, columns=list(COLUMNS))


def _sum_or_nan(values: pd.Series) -> float:
    return float(values.sum(min_count=1)) if values.notna().all() else math.nan


def _row(init: str, task: str, made: pd.DataFrame | None, runs: pd.DataFrame) -> dict[str, Any]:
    """One cost row; an init with no making rule (scratch) has no init cost."""
    return {
        "init": init,
        "task": task,
        "init_rule": None if made is None else str(made["rule"].iloc[0]),
        "init_device": None if made is None else _one_kind(made["kind"]),
        "init_s": None if made is None else float(made["s"].sum()),
        "init_gpu_h": None if made is None else _sum_or_nan(made["gpu_h"]),
        "finetune_device": _one_kind(runs["kind"]) if len(runs) else None,
        "finetune_jobs": len(runs),
        "finetune_s": float(runs["s"].sum()) if len(runs) else 0.0,
        "finetune_s_per_job": float(runs["s"].mean()) if len(runs) else None,
        "finetune_gpu_h": _sum_or_nan(runs["gpu_h"]) if len(runs) else None,
        "finetune_max_rss_mb": float(runs["rss"].max()) if runs["rss"].notna().any() else None,
    }


def with_scores(costs: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """``costs`` with each (init, task)'s mean score per metric and fraction from summary.csv.

    Columns ``<metric>@<fraction>`` hold the summary's ``mean``; the "all" rows get none.
    """
    missing = {"task", "metric", "fraction", "init", "mean"} - set(summary.columns)
    if missing:
        raise ValueError(f"summary table lacks columns {sorted(missing)}")
    scores = summary.assign(
        column=summary["metric"].astype(str) + "@" + summary["fraction"].map("{:g}".format)
    ).pivot_table(index=["init", "task"], columns="column", values="mean", aggfunc="first")
    scores.columns.name = None
    joined = costs.merge(
        scores.reset_index().astype({"init": str, "task": str}), on=["init", "task"], how="left"
    )
    return joined


def _missing(value: Any) -> bool:
    """None, or the NaN a DataFrame turns None into."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value: Any) -> str:
    return "" if _missing(value) else str(value)


def _hours(value: Any, kind: Any) -> str:
    """A GPU-hours cell: the number on a GPU, else the device kind ("CPU")."""
    if _missing(kind):
        return ""
    if kind != "GPU":
        return str(kind)
    return f"{value:.3g}"


def _number(value: Any, digits: str = ".1f") -> str:
    return "" if _missing(value) else format(value, digits)


def markdown(table: pd.DataFrame) -> str:
    """The cost table as Markdown, one section per task; GPU-hours read "CPU" for CPU runs."""
    score_columns = [c for c in table.columns if c not in COLUMNS]
    lines = [
        "# Compute cost per initialisation",
        "",
        "Seconds are Snakemake's benchmark wall time; GPU-hours count GPU runs only "
        "(a CPU run says CPU). Making the init (pre-training, import or supervised "
        "training) is paid once for all tasks.",
    ]
    for task in [*sorted(t for t in set(table["task"]) if t != "all"), "all"]:
        rows = table[table["task"] == task]
        if rows.empty:
            continue
        scores = [c for c in score_columns if rows[c].notna().any()]
        header = ["init", "made by", "init s", "init GPU-h", "fine-tunes", "fine-tune s",
                  "s per fine-tune", "fine-tune GPU-h", *scores]  # fmt: skip
        lines += ["", f"## {'all tasks' if task == 'all' else task}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
        for row in rows.to_dict("records"):
            cells = [
                row["init"],
                _text(row["init_rule"]),
                _number(row["init_s"]),
                _hours(row["init_gpu_h"], row["init_device"]),
                str(row["finetune_jobs"]),
                _number(row["finetune_s"]),
                _number(row["finetune_s_per_job"]),
                _hours(row["finetune_gpu_h"], row["finetune_device"]),
                *(_number(row[c], ".3f") for c in scores),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
