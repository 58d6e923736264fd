"""What the non-DICOM sources share: the pool, the ordered results, the finish.

Every source ends in :func:`medssl.datasets.conversion.driver.write_dataset`,
so the HDF5 layout, the rejects CSV and the root attributes are the DICOM
path's, and ``images seen = converted + rejected`` is checked the same way.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import pandas as pd

from medssl.datasets.conversion.driver import (
    Accounting,
    log_summary,
    make_pool,
    ordered_results,
    summarize,
    write_dataset,
)
from medssl.datasets.conversion.intensity import Intensity
from medssl.datasets.conversion.layout import META
from medssl.datasets.conversion.pixels import SeriesResult
from medssl.datasets.resizing import Grid
from medssl.datasets.sources.manifest import labels_table, write_labels

log = logging.getLogger(__name__)

__all__ = ["converted_ids", "finish", "make_pool", "ordered_results", "started_now"]


def finish(
    root: Path,
    out_h5: str | os.PathLike[str],
    rejects_csv: str | os.PathLike[str],
    cfg: dict[str, Any],
    intensity: Intensity,
    grid: Grid,
    results: Iterator[SeriesResult],
    found: Accounting,
    started: float,
    manifest: pd.DataFrame | None = None,
    labels_out: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write the dataset and rejects CSV, then the labels table of the converted rows
    (when a manifest and ``labels_out`` are given); log and return the summary."""
    n_converted, n_series = write_dataset(
        root, out_h5, rejects_csv, cfg, intensity, grid, results, found
    )
    summary = summarize(root, out_h5, found, n_converted, n_series, started)
    log_summary(summary)
    if manifest is not None and labels_out is not None:
        write_labels(labels_out, labels_table(manifest, converted_ids(out_h5)))
    return summary


def converted_ids(out_h5: str | os.PathLike[str]) -> list[str]:
    """The ``/meta/sop_uid`` column of a written dataset, in row order."""
    with h5py.File(out_h5, "r") as handle:
        return list(handle[META]["sop_uid"].asstr()[...])


def started_now() -> float:
    """The clock a summary's ``seconds`` counts from."""
    return time.perf_counter()
