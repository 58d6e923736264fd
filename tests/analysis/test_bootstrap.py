"""analysis.bootstrap: patients are resampled, not slices; predictions files read or absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medssl.analysis.bootstrap import (
    auc_statistic,
    cell_test_variance,
    combined_interval,
    dice_statistic,
    read_predictions,
)


def _patients(n_patients: int, slices: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Classification predictions where every slice of a patient is identical."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n_patients)
    scores = labels + rng.normal(0, 1.0, n_patients)
    return {
        "patient_id": np.repeat([f"p{k}" for k in range(n_patients)], slices),
        "labels": np.repeat(labels, slices),
        "scores": np.repeat(scores, slices),
    }


def test_identical_slices_give_the_patient_level_width() -> None:
    per_patient = _patients(40, 1)
    per_slice = _patients(40, 6)
    var_patient = cell_test_variance([per_patient], auc_statistic, 300, seed=1)
    var_slices = cell_test_variance([per_slice], auc_statistic, 300, seed=1)
    assert var_slices == pytest.approx(var_patient, rel=1e-12)
    # Resampling slices as if independent would be about sqrt(6) too narrow.
    as_slices = {**per_slice, "patient_id": np.arange(240).astype(str)}
    var_naive = cell_test_variance([as_slices], auc_statistic, 300, seed=1)
    assert var_naive < var_patient / 3


def test_runs_must_share_the_test_rows() -> None:
    with pytest.raises(ValueError, match="other test rows"):
        cell_test_variance([_patients(10, 2), _patients(11, 2)], auc_statistic, 10)


def test_combined_interval_adds_variances() -> None:
    low, high = combined_interval(0.8, 0.03, 0.04**2, 0.95)
    assert (high - low) / 2 == pytest.approx(1.959964 * 0.05, rel=1e-6)


def test_predictions_file_read_or_absent(tmp_path: Path) -> None:
    assert read_predictions(tmp_path) is None
    np.savez(
        tmp_path / "test_predictions.npz",
        case_id=np.array(["a", "b"]),
        intersection=np.array([5, 0]),
        pred_sum=np.array([6, 0]),
        ref_sum=np.array([4, 0]),
    )
    arrays = read_predictions(tmp_path)
    assert dice_statistic(arrays, np.array([0, 1])) == pytest.approx((10 / 10 + 1.0) / 2)
    np.savez(tmp_path / "test_predictions.npz", labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="test_predictions.npz: needs patient_id"):
        read_predictions(tmp_path)
