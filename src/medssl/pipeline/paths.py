"""Output locations derived from the config must stay inside the results folder.

Names in the config (datasets, tasks, initialisations, pre-training methods)
become parts of output paths (``results/data/<dataset>.h5``,
``results/finetune/<init>/...``). A name such as ``../../home/x`` or
``/etc/x`` would make a job write, or Snakemake delete, files outside the
results folder. The schema restricts names to letters, digits, ``_`` and
``-``; this module is the independent check on the paths themselves, run with
the configuration's reference checks, so that a later schema change or a
config validated without the schema cannot open that door. Inputs
(``dicom_dir``, ``labels``, checkpoints to import) may live anywhere.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

RESULTS = "results"
"""The results folder, relative to the workflow's working directory."""


def escapes(relative: str) -> bool:
    """True when ``relative`` is absolute or leaves its base folder once normalised."""
    text = str(relative)
    if not text or text.startswith(("/", "\\")) or "\\" in text or "\x00" in text:
        return True
    normal = posixpath.normpath(text)
    return normal == ".." or normal.startswith("../") or normal == "."


def output_locations(config: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """``(config key, name, path under results/)`` for every output a config name decides."""
    for name in (config.get("data") or {}).get("datasets") or {}:
        yield f"data.datasets.{name}", name, f"data/{name}.h5"
    for name in config.get("tasks") or {}:
        yield f"tasks.{name}", name, f"splits/{name}.csv"
    for index, method in enumerate((config.get("pretrain") or {}).get("methods") or []):
        yield f"pretrain.methods[{index}]", method, f"init/{method}/encoder.pt"
    for name in config.get("inits") or {}:
        yield f"inits.{name}", name, f"finetune/{name}/metrics.json"


def check_outputs(config: dict[str, Any]) -> Iterator[str]:
    """One message per config name that would put an output outside ``results/``.

    A name must be one path component: anything that normalises to another
    folder (``..``, ``a/b``, an absolute path) is refused, not only names that
    leave the folder, since ``a/../b`` would alias another name's outputs.
    """
    for key, name, relative in output_locations(config):
        text = str(name)
        if escapes(relative) or escapes(text) or posixpath.normpath(text) != text or "/" in text:
            yield (
                f"{key}: name {text!r} would write {RESULTS}/{relative}, outside its own "
                f"folder of {RESULTS}/; use letters, digits, '_' and '-'"
            )
