"""Test-set uncertainty: a patient-level bootstrap of the test split from the predictions files.

Seed intervals measure how much a result moves when fine-tuning is redone;
they say nothing about how much it would move on another test set drawn from
the same population. Fine-tuning writes ``test_predictions.npz`` beside each
metrics.json (classification: ``sample_index, patient_id, labels, scores``;
segmentation: per case ``case_id, intersection, pred_sum, ref_sum``), from
which the test metric can be recomputed on resampled test sets.

The unit resampled is the *patient*: slices of one patient are strongly
correlated, so resampling slices would treat them as independent and give an
interval too narrow by up to the square root of the slices per patient.
Segmentation files without ``patient_id`` are resampled by ``case_id`` (the
stated fallback: each case taken as its own patient).

How the two sources combine (:func:`combined_interval`): every run of a task
is scored on the same test split, so one resample of patients is applied to
every run of a cell at once and the cell mean recomputed; the variance of
that mean over resamples is the test-set variance of the mean, added to the
squared seed standard error (the two are independent: which patients are in
the test set does not depend on the fine-tune seed). The interval is normal
on the sum, which the legend states.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from medssl.analysis.delong import delong

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "test_predictions.npz"
CLASSIFICATION_KEYS: tuple[str, ...] = ("patient_id", "labels", "scores")
SEGMENTATION_KEYS: tuple[str, ...] = ("case_id", "intersection", "pred_sum", "ref_sum")

Predictions = Mapping[str, np.ndarray]
Statistic = Callable[[Predictions, np.ndarray], float]
"""``statistic(predictions, rows)``: the metric on the given rows (with repeats) of a run."""


def read_predictions(
    run_dir: str | Path, name: str = PREDICTIONS_FILE
) -> dict[str, np.ndarray] | None:
    """The run's test predictions, or None for a run written before they existed."""
    path = Path(run_dir) / name
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    if not (set(CLASSIFICATION_KEYS) <= set(arrays) or set(SEGMENTATION_KEYS) <= set(arrays)):
        raise ValueError(
            f"{path}: needs {', '.join(CLASSIFICATION_KEYS)} (classification) or "
            f"{', '.join(SEGMENTATION_KEYS)} (segmentation); has {sorted(arrays)}"
        )
    return arrays


def patient_units(predictions: Predictions) -> np.ndarray:
    """The resampling unit of each row: ``patient_id``, else ``case_id`` (see the module doc)."""
    key = "patient_id" if "patient_id" in predictions else "case_id"
    return np.asarray(predictions[key]).astype(str)


def auc_statistic(predictions: Predictions, rows: np.ndarray) -> float:
    """Binary AUC of the rows (scores of shape (N,) or (N, 2): the positive column).

    NaN for multi-class or multi-label scores, whose AUC this module does not recompute.
    """
    labels = np.asarray(predictions["labels"])
    scores = np.asarray(predictions["scores"], dtype=float)
    if labels.ndim != 1 or (scores.ndim == 2 and scores.shape[1] != 2) or scores.ndim > 2:
        return math.nan
    labels = labels[rows]
    scores = scores[:, -1] if scores.ndim == 2 else scores
    positive = labels.astype(bool)
    if positive.all() or not positive.any():
        return math.nan
    ranks = sps.rankdata(scores[rows])
    m, n = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - m * (m + 1) / 2) / (m * n))


def dice_statistic(predictions: Predictions, rows: np.ndarray) -> float:
    """Mean per-case Dice, 2|A∩B| / (|A| + |B|), 1 where both masks are empty."""
    inter = np.asarray(predictions["intersection"], dtype=float)[rows]
    total = (np.asarray(predictions["pred_sum"], dtype=float) + predictions["ref_sum"])[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total > 0, 2 * inter / total, 1.0)
    return float(dice.mean())


STATISTICS: dict[str, Statistic] = {"auc": auc_statistic, "dice": dice_statistic}
"""Metric -> how to recompute it from a predictions file (the metrics this module can bootstrap)."""


def resample_patients(units: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """``n_boot`` resamples of the rows: whole patients drawn with replacement."""
    names, inverse = np.unique(units, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(names.size)]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, names.size, size=(n_boot, names.size))
    return [np.concatenate([members[k] for k in pick]) for pick in picks]


def cell_test_variance(
    runs: Sequence[Predictions], statistic: Statistic, n_boot: int, seed: int = 0
) -> float:
    """Test-set variance of the mean over a cell's runs: one patient resample for all runs.

    All runs must hold the same test rows in the same order (one test split per
    task); a run that does not is an error, since its resample would not be the
    same patients.
    """
    if not runs:
        return math.nan
    units = patient_units(runs[0])
    for k, run in enumerate(runs[1:], start=1):
        if not np.array_equal(patient_units(run), units):
            raise ValueError(f"run {k} of the cell was scored on other test rows than run 0")
    means = []
    for rows in resample_patients(units, n_boot, seed):
        values = [statistic(run, rows) for run in runs]
        means.append(np.nanmean(values) if np.isfinite(values).any() else math.nan)
    means = np.asarray(means, dtype=float)
    means = means[np.isfinite(means)]
    return float(np.var(means, ddof=1)) if means.size >= 2 else math.nan


def combined_interval(
    mean: float, sem: float, test_variance: float, confidence: float
) -> tuple[float, float]:
    """Normal interval on ``sem² + test variance`` (seed and test-set noise, independent)."""
    seed_var = sem * sem if math.isfinite(sem) else 0.0
    total = seed_var + test_variance
    if not (math.isfinite(total) and math.isfinite(mean)):
        return math.nan, math.nan
    half = float(sps.norm.ppf((1 + confidence) / 2)) * math.sqrt(total)
    return mean - half, mean + half


def delong_auc_se(predictions: Predictions) -> float:
    """DeLong's standard error of one run's AUC: the case-level (not patient-level) reference."""
    scores = np.asarray(predictions["scores"], dtype=float)
    scores = scores[:, -1] if scores.ndim == 2 else scores
    return float(math.sqrt(delong(np.asarray(predictions["labels"]), scores).covariance[0, 0]))


TEST_COLUMNS: tuple[str, ...] = ("test_se", "ci_total_low", "ci_total_high")
"""summary.csv columns added when the test-set bootstrap ran (NaN where it could not)."""


def collect_predictions(root: str | Path) -> dict[tuple[str, str, float], list[Predictions]]:
    """``(task, init, fraction) -> predictions of its runs in seed order`` under ``root``.

    Each run of a ``metrics.json`` (one, or a list from a job of several seeds)
    names its predictions file in its ``test_predictions`` key (default
    ``test_predictions.npz``), read from beside it. Runs without one (written
    before the file existed) are left out, with one log line.
    """
    from medssl.core.files import read_json

    found: dict[tuple[str, str, float], list[tuple[int, Predictions]]] = {}
    missing = 0
    for path in sorted(Path(root).rglob("metrics.json")):
        payload = read_json(path)
        for run in payload if isinstance(payload, list) else [payload]:
            name = run.get("test_predictions") or PREDICTIONS_FILE
            arrays = read_predictions(path.parent, str(name))
            if arrays is None:
                missing += 1
                continue
            key = (str(run["task"]), str(run["init"]), float(run["fraction"]))
            found.setdefault(key, []).append((int(run["seed"]), arrays))
    if missing:
        log.warning(
            "%d run(s) under %s have no test predictions file beside their metrics.json: "
            "their cells get no test-set interval",
            missing,
            root,
        )
    return {key: [a for _, a in sorted(runs, key=lambda r: r[0])] for key, runs in found.items()}


def add_test_set_uncertainty(
    summary: pd.DataFrame,
    predictions: Mapping[tuple[str, str, float], Sequence[Predictions]],
    n_boot: int,
    seed: int,
    confidence: float,
) -> pd.DataFrame:
    """summary.csv with ``test_se`` and the combined interval (``ci_total_low/high``).

    Only metrics of :data:`STATISTICS` can be recomputed from predictions; the
    other rows and cells without predictions keep NaN, and every row that got
    a combined interval says so in ``notes``.
    """
    out = summary.copy()
    for column in TEST_COLUMNS:
        out[column] = math.nan
    note = f"ci_total includes test-set variance (patient bootstrap, {n_boot} resamples)"
    for index, row in out.iterrows():
        statistic = STATISTICS.get(str(row["metric"]))
        runs = predictions.get((str(row["task"]), str(row["init"]), float(row["fraction"])))
        if statistic is None or not runs:
            continue
        variance = cell_test_variance(list(runs), statistic, n_boot, seed)
        low, high = combined_interval(float(row["mean"]), float(row["sem"]), variance, confidence)
        out.loc[index, list(TEST_COLUMNS)] = [math.sqrt(variance), low, high]
        notes = str(row.get("notes") or "")
        out.loc[index, "notes"] = f"{notes}; {note}" if notes else note
    return out
