"""Metrics must match scikit-learn's definitions (and a reference Dice); never invent an AUC."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from medssl.core.registry import UnknownNameError
from medssl.finetuning.metrics import (
    SCORE_LAYOUTS,
    classification_metrics,
    multilabel_metrics,
    predictions,
    segmentation_metrics,
)
from medssl.finetuning.tasktypes import TASK_TYPES


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
    with pytest.raises(UnknownNameError, match="unknown classification task type 'regression'"):
        classification_metrics("regression", np.array([0, 1]), np.array([0.2, 0.3]))
    with pytest.raises(UnknownNameError, match="did you mean 'multiclass'"):
        predictions("multiclas", np.array([[0.2, 0.8]]))


def test_score_layouts_are_classification_task_types_with_their_metrics() -> None:
    """Each layout scores a registered task type, with exactly that type's metrics."""
    rng = np.random.default_rng(0)
    for name in SCORE_LAYOUTS:
        labels = np.array([0, 1, 1, 0])
        scores = rng.random(4) if name == "binary" else np.eye(2)[[0, 1, 0, 0]]
        assert tuple(classification_metrics(name, labels, scores)) == TASK_TYPES[name].metrics


def test_segmentation_metrics_reference_values() -> None:
    truth = np.zeros((3, 4, 4), dtype=bool)
    truth[0, :2] = True  # 8 pixels
    truth[1, 0, 0] = True
    probs = np.zeros((3, 4, 4))
    probs[0, :1] = 0.9  # 4 of 8 found: Dice 2*4/12, IoU 4/8
    probs[1, 3, 3] = 0.7  # a miss: 0
    # slice 2: nothing in either: 1
    values = segmentation_metrics(truth, probs)
    assert values["dice"] == pytest.approx((2 * 4 / 12 + 0 + 1) / 3)
    assert values["iou"] == pytest.approx((0.5 + 0 + 1) / 3)


def test_multilabel_auc_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, (40, 4))
    labels[:, 3] = 1  # undefined AUC: left out of the mean
    scores = np.clip(labels * 0.3 + rng.random((40, 4)), 0, 1)
    values = multilabel_metrics(labels, scores)
    expected = [roc_auc_score(labels[:, j], scores[:, j]) for j in range(3)]
    assert values["auc"] == pytest.approx(np.mean(expected))
    assert values["auc_per_label"][:3] == pytest.approx(expected)
    assert math.isnan(values["auc_per_label"][3])
    assert values["accuracy"] == pytest.approx(np.mean((scores >= 0.5) == labels))
