"""The conversion of one DICOM folder: header pass, plan, pixel pass, write, account.

With more than one worker the header pass and the pixel pass run in a process
pool; the single writer takes results in plan order, so the output does not
depend on the number of workers (a test checks it byte for byte).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from medssl.core.files import atomic_path
from medssl.datasets.conversion.intensity import Intensity
from medssl.datasets.conversion.pixels import SeriesResult, iter_blocks, process_series
from medssl.datasets.conversion.planning import SeriesPlan, plan_series
from medssl.datasets.conversion.settings import resolve_settings
from medssl.datasets.conversion.writing import (
    reason_counts,
    write_images,
    write_rejects,
    write_root_attrs,
)
from medssl.datasets.resizing import Grid
from medssl.dicom.reading import Rejection, SliceHeader, iter_files, read_header

log = logging.getLogger(__name__)

#: Reasons that mark a file that is not an image at all (a README, an RTSTRUCT, a
#: report): listed in the rejects CSV like every file, but not a lost image.
NOT_IMAGE_REASONS = ("not DICOM", "non-image SOP class")

#: Tasks in flight per worker: enough to keep workers busy, small enough to bound memory.
PREFETCH_PER_WORKER = 2
#: Slices per task sent to a worker process (a series is split into such parts).
SLICES_PER_TASK = 64


class NoUsableImagesError(RuntimeError):
    """Nothing in the folder could be converted; the message names the folder."""


class TooManyRejectsError(RuntimeError):
    """More files were rejected than ``max_reject_fraction`` allows."""


@dataclass
class Inventory:
    """Every image found in the folder, planned into series or rejected with a reason."""

    n_files: int
    n_seen: int  # images: a multi-frame file counts once per frame
    plans: list[SeriesPlan]
    rejected: list[Rejection]
    findings: dict[str, list[str]]


def convert(
    dicom_dir: str | os.PathLike[str],
    out_h5: str | os.PathLike[str],
    rejects_csv: str | os.PathLike[str],
    settings: dict[str, Any] | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Convert a DICOM folder; write the HDF5 dataset and the rejects CSV; return a summary.

    Raises :class:`NoUsableImagesError` (after writing the rejects CSV) when no
    slice survives, and ``FileNotFoundError`` when the folder does not exist.
    """
    cfg = resolve_settings(settings)
    intensity = Intensity.from_settings(cfg["intensity"])
    root = Path(dicom_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: DICOM folder does not exist")
    started = time.perf_counter()
    workers = max(1, int(threads))
    pool = make_pool(workers)
    try:
        found = _inventory(root, cfg, pool, workers)
        n_converted, n_series = _write_outputs(
            root, out_h5, rejects_csv, cfg, intensity, found, pool, workers
        )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    summary = summarize(
        root,
        out_h5,
        Accounting(found.n_files, found.n_seen, found.rejected, found.findings, "dicom"),
        n_converted,
        n_series,
        started,
    )
    summary["dicom_dir"] = str(root)
    log_summary(summary)
    return summary


def summarize(
    root: Path,
    out_h5: str | os.PathLike[str],
    found: Accounting,
    n_converted: int,
    n_series: int,
    started: float,
) -> dict[str, Any]:
    """The summary a conversion returns and logs; checks that the images add up."""
    n_rejected = len(found.rejected)
    assert found.n_seen == n_converted + n_rejected, (found.n_seen, n_converted, n_rejected)
    return {
        "not_images": count_not_images(found.rejected),
        "source": found.source,
        "root": str(root),
        "out": str(out_h5),
        "files_seen": found.n_files,
        "images_seen": found.n_seen,
        "converted": n_converted,
        "rejected": n_rejected,
        "series": n_series,
        "reasons": reason_counts(found.rejected),
        "findings": found.findings,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _inventory(
    root: Path, cfg: dict[str, Any], pool: ProcessPoolExecutor | None, workers: int
) -> Inventory:
    """Header pass and series plan: what will be converted, and what is rejected why."""
    n_files, scanned = _scan(root, cfg["modalities"], pool, workers)
    headers = [h for h in scanned if isinstance(h, SliceHeader)]
    rejected = [r for r in scanned if isinstance(r, Rejection)]
    key_env = cfg["pseudonym_key_env"]
    plans, series_rejects = plan_series(
        headers,
        cfg["image_size"],
        cfg["gap_policy"],
        float(cfg["gap_tolerance"]),
        os.environ[key_env].encode("utf-8") if key_env else None,
        cfg["tilt_policy"],
        cfg["geometry"],
        cfg["patient_key"],
    )
    rejected.extend(series_rejects)
    findings = {p.series_uid.split("#")[0]: p.findings for p in plans if p.findings}
    return Inventory(n_files, len(scanned), plans, rejected, findings)


def _write_outputs(
    root: Path,
    out_h5: str | os.PathLike[str],
    rejects_csv: str | os.PathLike[str],
    cfg: dict[str, Any],
    intensity: Intensity,
    found: Inventory,
    pool: ProcessPoolExecutor | None,
    workers: int,
) -> tuple[int, int]:
    """The series plans' pixels through :func:`write_dataset`."""
    grid = Grid.plan(
        (
            (
                (p.slices[0].rows, p.slices[0].columns),
                p.slices[0].pixel_spacing,
                len(p.slices),
            )
            for p in found.plans
        ),
        cfg["geometry"],
        cfg["image_size"],
        cfg["target_spacing"],
        cfg["fit"],
    )
    results = _ordered_results(found.plans, intensity, grid, pool, workers, cfg["compression"])
    return write_dataset(
        root,
        out_h5,
        rejects_csv,
        cfg,
        intensity,
        grid,
        results,
        Accounting(found.n_files, found.n_seen, found.rejected, found.findings, "dicom"),
    )


@dataclass
class Accounting:
    """What a source found before the pixel pass: files and images seen, rejects so
    far (the pixel pass adds its own), series findings, and the source's name."""

    n_files: int
    n_seen: int
    rejected: list[Rejection]
    findings: dict[str, list[str]]
    source: str
    #: Further root attributes of the source (NIfTI: ``volume_orientation``).
    attrs: dict[str, str] = field(default_factory=dict)


def write_dataset(
    root: Path,
    out_h5: str | os.PathLike[str],
    rejects_csv: str | os.PathLike[str],
    cfg: dict[str, Any],
    intensity: Intensity,
    grid: Grid,
    results: Iterator[SeriesResult],
    found: Accounting,
) -> tuple[int, int]:
    """The HDF5 file (atomically: none on failure) and, in every case, the rejects CSV;
    shared by every source. Returns (slices, series) written."""
    try:
        with atomic_path(out_h5) as tmp:
            n_converted, n_series = write_images(
                tmp, results, intensity, grid.stored, cfg["compression"], found.rejected
            )
            write_root_attrs(
                tmp,
                cfg,
                found.n_files,
                found.n_seen,
                n_converted,
                found.rejected,
                n_series,
                found.findings,
                found.source,
                found.attrs,
            )
            if n_converted == 0:
                raise NoUsableImagesError(
                    f"{root}: no usable images ({found.n_seen} images seen, all rejected; "
                    f"reasons in {rejects_csv})"
                )
            check_reject_fraction(root, rejects_csv, found.n_seen, found.rejected, cfg)
    finally:
        write_rejects(rejects_csv, found.rejected)
    return n_converted, n_series


def count_not_images(rejected: Sequence[Rejection]) -> int:
    """Rejected files that are not images (:data:`NOT_IMAGE_REASONS`)."""
    return sum(r.reason.startswith(NOT_IMAGE_REASONS) for r in rejected)


def log_summary(summary: dict[str, Any]) -> None:
    if summary["not_images"]:
        log.info(
            "%s: %d of the %d files are not images (not DICOM or no image SOP class)",
            summary["root"],
            summary["not_images"],
            summary["files_seen"],
        )
    log.info(
        "%s: %d files, %d images seen = %d converted + %d rejected; %d series -> %s in %.1f s",
        summary["root"],
        summary["files_seen"],
        summary["images_seen"],
        summary["converted"],
        summary["rejected"],
        summary["series"],
        summary["out"],
        summary["seconds"],
    )
    for reason, count in summary["reasons"].items():
        log.info("  rejected %d: %s", count, reason)
    for series_uid, notes in summary["findings"].items():
        log.warning("  series %s: %s", series_uid, "; ".join(notes))


def _pool_context() -> multiprocessing.context.BaseContext:
    """How worker processes start: ``fork`` when this process runs no other Python
    thread, else ``forkserver``.

    A forked worker starts in milliseconds with every module already imported;
    a forkserver starts a fresh interpreter that imports numpy, h5py and
    pydicom first (5 s on the loaded development machine, a fifth of a 5,000-slice
    conversion). Forking a process with running threads can deadlock the child,
    so then the server is used, preloading this module (and so the workers'
    code) once for all workers. The pool is created before any HDF5 file is open.
    """
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def check_reject_fraction(
    root: Path,
    rejects_csv: Any,
    n_seen: int,
    rejected: Sequence[Rejection],
    cfg: dict[str, Any],
) -> None:
    """A WARNING above ``warn_reject_fraction`` (with the count and the reasons), and a
    failure (inside the atomic write, so no HDF5 is left) above ``max_reject_fraction``.

    The warning is there because a conversion that quietly drops a tenth of an
    archive still succeeds, and the log is the only place a user would notice.
    """
    if n_seen == 0:
        return
    n_rejected = len(rejected)
    fraction = n_rejected / n_seen
    images = [r for r in rejected if not r.reason.startswith(NOT_IMAGE_REASONS)]
    n_images = n_seen - (n_rejected - len(images))
    warn = cfg.get("warn_reject_fraction")
    if warn is not None and n_images and len(images) / n_images > warn:
        reasons = "; ".join(f"{c} x {r}" for r, c in reason_counts(images).items())
        log.warning(
            "%s: %d of %d images rejected (%.1f%%, more than warn_reject_fraction %.1f%%): %s",
            root,
            len(images),
            n_images,
            100 * len(images) / n_images,
            100 * warn,
            reasons,
        )
    limit = cfg["max_reject_fraction"]
    if limit is not None and fraction > limit:
        raise TooManyRejectsError(
            f"{root}: {n_rejected} of {n_seen} images rejected ({fraction:.1%}), more than "
            f"max_reject_fraction {limit:.1%}; reasons in {rejects_csv}"
        )


def _scan(
    root: Path, modalities: Sequence[str], pool: ProcessPoolExecutor | None, workers: int
) -> tuple[int, list[SliceHeader | Rejection]]:
    """Header pass over every file, in parallel when a pool is given.

    Returns the number of files and one entry per image: a single-frame file or
    a rejected file is one image, a multi-frame file one image per frame.
    """
    paths = list(iter_files(root))
    if pool is None:
        results = [read_header(p, root, modalities) for p in paths]
    else:
        chunk = max(1, min(256, len(paths) // (4 * workers)))
        results = list(
            pool.map(
                read_header,
                paths,
                [root] * len(paths),
                [tuple(modalities)] * len(paths),
                chunksize=chunk,
            )
        )
    items: list[SliceHeader | Rejection] = []
    for result in results:
        items.extend(result if isinstance(result, list) else [result])
    return len(paths), items


def _ordered_results(
    plans: Sequence[SeriesPlan],
    intensity: Intensity,
    grid: Grid,
    pool: ProcessPoolExecutor | None,
    workers: int,
    compression: str,
) -> Iterator[SeriesResult]:
    """Series results in plan order, with at most a few series in flight per worker.

    Workers hand back compressed chunks; one process alone writes plain arrays
    (encoding first would only add a copy).
    """
    if pool is None:
        for plan in plans:
            yield from iter_blocks(plan, intensity, grid)
        return
    parts = [part for plan in plans for part in plan.parts(SLICES_PER_TASK)]
    yield from ordered_results(process_series, parts, (intensity, grid, compression), pool)


Task = TypeVar("Task")


def make_pool(threads: int) -> ProcessPoolExecutor | None:
    """Worker processes for a conversion (see :func:`_pool_context`), none for one thread."""
    workers = max(1, int(threads))
    return ProcessPoolExecutor(workers, mp_context=_pool_context()) if workers > 1 else None


def ordered_results(
    work: Callable[..., SeriesResult],
    tasks: Sequence[Task],
    args: tuple[Any, ...],
    pool: ProcessPoolExecutor | None,
) -> Iterator[SeriesResult]:
    """``work(task, *args)`` for each task, in task order, a few tasks in flight per
    worker (memory holds a few results, never the dataset); every source's pixel pass."""
    if pool is None:
        for task in tasks:
            yield work(task, *args)
        return
    limit = PREFETCH_PER_WORKER * pool._max_workers  # noqa: SLF001 - the pool's own size
    upcoming = iter(tasks)
    pending: deque[Future[SeriesResult]] = deque()
    for task in upcoming:
        pending.append(pool.submit(work, task, *args))
        if len(pending) >= limit:
            break
    while pending:
        result = pending.popleft().result()
        nxt = next(upcoming, None)
        if nxt is not None:
            pending.append(pool.submit(work, nxt, *args))
        yield result
