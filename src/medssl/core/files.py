"""Atomic file output.

A job killed half-way must never leave a file that looks complete to Snakemake
or to a reader, so every artefact is written to a temporary sibling and renamed
into place (``os.replace`` is atomic on POSIX within one file system).

The temporary sibling is hidden and named ``.<name>.<random>.part``. A job that
fails with an exception removes it; a job killed outright (SIGKILL, power
loss) cannot, so the next write of the same file removes the leftovers of
earlier attempts. A write that fails because the disk is full or the folder is
not writable raises an error naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from medssl.core.faults import fault_point

_STORAGE_ERRORS: dict[int, str] = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file size limit was reached",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied: the folder is not writable",
    errno.EPERM: "operation not permitted: the folder is not writable",
}
"""errno values that mean "this storage cannot take the file", with a plain explanation."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left
    untouched; storage errors (disk full, read-only or unwritable folder) are
    re-raised as the same ``OSError`` type with a message naming ``path``.
    """
    target = Path(path)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_parts(target)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part", dir=target.parent
        )
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        fault_point(f"before_rename:{target.name}")
        # mkstemp creates files readable by the owner only; results are meant to
        # be shared like any other file, so apply the usual umask instead.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except OSError as err:
        _discard(tmp)
        if err.errno in _STORAGE_ERRORS and str(target) not in str(err):
            raise type(err)(
                err.errno,
                f"cannot write {target}: {_STORAGE_ERRORS[err.errno]} "
                f"({err.strerror or err}); nothing was written under this name",
            ) from err
        raise
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path | None) -> None:
    """Remove a temporary file if there is one (it may never have been created)."""
    if tmp is not None:
        tmp.unlink(missing_ok=True)


def _remove_stale_parts(target: Path) -> None:
    """Delete temporary siblings that killed writers of ``target`` left behind.

    Safe because one output file has one writer at a time: Snakemake runs at
    most one job per output and holds a lock on the working directory. The
    pattern matches ``tempfile``'s 8 random characters exactly, so the
    temporary files of ``x.csv.provenance.json`` are not taken for those of
    ``x.csv``.
    """
    name = f".{glob.escape(target.name)}.{'?' * 8}.part"
    pattern = os.path.join(glob.escape(str(target.parent)), name)
    for stale in glob.glob(pattern):
        Path(stale).unlink(missing_ok=True)


def _umask() -> int:
    """The process umask (reading it requires setting it, so set it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented, key-sorted, standard JSON, atomically.

    JSON has no NaN: Python's ``json`` would write the non-standard literal
    ``NaN``, which other tools reject. A NaN (an undefined value, such as the
    AUC of a test set holding one class) is written as ``null`` instead, so a
    literal ``NaN`` in a medssl file means it was not written by medssl.
    Infinite values are refused: no medssl output has a meaning for them.
    """
    text = json.dumps(
        _nan_to_null(payload, Path(path)),
        indent=2,
        sort_keys=True,
        default=_json_default,
        allow_nan=False,
    )
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def _nan_to_null(value: Any, path: Path, key: str = "") -> Any:
    """``value`` with every float NaN replaced by None; an infinity is an error naming the key."""
    if isinstance(value, dict):
        return {k: _nan_to_null(v, path, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_null(v, path, f"{key}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return None
        raise ValueError(f"{path}: key {key or '(top level)'!r} is {value}; refusing to write it")
    return value


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, with bytes that depend on ``obj`` only.

    ``torch.save`` to a file names the zip archive inside after the file, so
    saving to a randomly named temporary file would make two identical
    encoders differ byte for byte. Serialising to memory first gives the
    archive a fixed name.
    """
    import torch  # here, so that table-only stages do not load torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, naming the file in the error if it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def write_csv(path: str | os.PathLike[str], frame: pd.DataFrame) -> None:
    """Write a data frame as CSV without its index, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(value: Any) -> Any:
    """Serialise NumPy scalars and paths, which ``json`` refuses by default."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
