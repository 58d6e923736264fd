"""Provenance records attached to every artefact.

A number in a paper's table must trace back to the code, settings and seed
that produced it; each output carries this record beside or inside it.
"""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from medssl import __version__

_PACKAGES = ("torch", "torchvision", "monai", "numpy", "pydicom", "h5py", "scipy", "statsmodels")


@functools.cache
def git_commit() -> str | None:
    """The commit of the medssl checkout, or None outside a git checkout."""
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@functools.cache
def package_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour changes numbers."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def record(stage: str, settings: dict[str, Any] | None = None, seed: int | None = None) -> dict:
    """A provenance record: stage, medssl version and commit, settings, seed, packages."""
    return {
        "stage": stage,
        "medssl_version": __version__,
        "git_commit": git_commit(),
        "settings": settings or {},
        "seed": seed,
        "packages": package_versions(),
        "command": " ".join(sys.argv),
    }


def sidecar_path(output: str | Path) -> Path:
    """Provenance file of an output that has no room for metadata: ``x.md.provenance.json``."""
    output = Path(output)
    return output.with_name(output.name + ".provenance.json")


def write_sidecar(
    output: str | Path,
    stage: str,
    settings: dict[str, Any] | None = None,
    seed: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write :func:`record` (plus ``extra`` facts, e.g. row counts) beside ``output``.

    The one writer of ``<output>.provenance.json``: tables and text carry no
    metadata of their own, so every table stage records its origin here.
    """
    from medssl.core.files import write_json  # here: core.files must not import this module

    path = sidecar_path(output)
    write_json(path, {**record(stage, settings, seed), **(extra or {})})
    return path


def write_table(
    output: str | Path,
    frame: Any,
    stage: str,
    settings: dict[str, Any] | None = None,
    *,
    sidecar: bool = True,
    extra: dict[str, Any] | None = None,
) -> None:
    """A CSV table (atomically) and, unless ``sidecar`` is False, its provenance sidecar."""
    from medssl.core.files import write_csv

    write_csv(output, frame)
    if sidecar:
        write_sidecar(output, stage, settings, extra=extra)
