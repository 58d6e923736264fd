"""medssl.finetuning.metrics must agree with scikit-learn's definitions, and never invent an AUC."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from medssl.finetuning.metrics import classification_metrics


@pytest.mark.parametrize("seed", range(5))
def test_binary_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    # Rounded scores create ties, which both implementations must count as half.
    scores = np.round(np.clip(0.3 * labels + rng.random(200) * 0.7, 0, 1), 2)
    got = classification_metrics("binary", labels, scores)
    pred = (scores >= 0.5).astype(int)
    assert got["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, pred), abs=1e-12)
    assert got["f1"] == pytest.approx(f1_score(labels, pred), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_multiclass_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 3, 150)
    logits = rng.normal(size=(150, 3)) + np.eye(3)[labels] * 0.8
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = classification_metrics("multiclass", labels, scores)
    pred = scores.argmax(1)
    expected_auc = roc_auc_score(labels, scores, multi_class="ovr", average="macro")
    assert got["auc"] == pytest.approx(expected_auc, abs=1e-12)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, pred), abs=1e-12)
    assert got["f1"] == pytest.approx(f1_score(labels, pred, average="macro"), abs=1e-12)


def test_multiclass_f1_with_class_never_predicted_matches_sklearn() -> None:
    labels = np.array([0, 1, 2, 2, 1, 0, 2])
    scores = np.array([[0.8, 0.1, 0.1]] * 4 + [[0.1, 0.8, 0.1]] * 3)
    got = classification_metrics("multiclass", labels, scores)
    pred = scores.argmax(1)
    assert got["f1"] == pytest.approx(f1_score(labels, pred, average="macro", zero_division=0))


def test_undefined_auc_is_nan() -> None:
    binary = classification_metrics("binary", np.zeros(10, dtype=int), np.linspace(0, 1, 10))
    assert math.isnan(binary["auc"])
    assert binary["accuracy"] == pytest.approx(0.5)
    labels = np.array([0, 1, 0, 1, 0, 1])  # class 2 absent
    scores = np.full((6, 3), 1 / 3)
    assert math.isnan(classification_metrics("multiclass", labels, scores)["auc"])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics("binary", np.array([0, 1]), np.array([0.2, np.nan]))
    with pytest.raises(ValueError, match="shape"):
        classification_metrics("multiclass", np.array([0, 1]), np.array([0.2, 0.3]))
    with pytest.raises(ValueError, match="task type"):
        classification_metrics("regression", np.array([0, 1]), np.array([0.2, 0.3]))
