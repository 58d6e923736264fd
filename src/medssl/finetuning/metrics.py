"""Metrics of one evaluation: ROC AUC, accuracy and F1; mean AUC over labels; Dice and IoU.

MONAI's implementations are used (``compute_roc_auc``, ``get_confusion_matrix``)
so the numbers match what the medical-imaging community reports with the same
library; the tests pin them to scikit-learn's definitions.

Conventions, chosen to match scikit-learn:

* binary: ``scores`` is the probability of class 1, the prediction is
  ``score >= 0.5``; AUC and F1 are those of the positive class;
* multi-class: ``scores`` is (N, K) class probabilities, the prediction is the
  arg-max (first class on ties); AUC is the macro one-vs-rest mean and F1 the
  macro mean over the classes present in the labels or the predictions;
* an AUC that is undefined (a class absent from the labels) is NaN, never a
  substitute number, so a downstream mean cannot silently include it;
* multi-label: :func:`multilabel_metrics` (mean AUC over labels);
  segmentation: :func:`segmentation_metrics` (per-slice Dice and IoU).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from medssl.core.registry import Registry


class ScoreLayout:
    """How the scores of one classification task type look and become class codes.

    The metric functions are the same for every layout; what differs (the
    shape of ``scores``, the prediction rule, the AUC's target, which F1 is
    reported) is answered here, so no function branches on a task type's name.
    """

    def check(self, labels: np.ndarray, scores: np.ndarray) -> None:
        """Raise ``ValueError`` when ``scores`` cannot be this layout's scores of ``labels``."""
        raise NotImplementedError

    def n_classes(self, scores: np.ndarray) -> int:
        raise NotImplementedError

    def predictions(self, scores: np.ndarray) -> np.ndarray:
        """Hard class codes of ``scores``."""
        raise NotImplementedError

    def auc_target(self, labels: np.ndarray, scores: np.ndarray) -> torch.Tensor:
        """MONAI ``compute_roc_auc``'s target for these labels (same shape as ``scores``)."""
        raise NotImplementedError

    def f1(self, per_class: torch.Tensor, present: torch.Tensor) -> float:
        """The reported F1 from per-class F1 and the classes present in labels or predictions."""
        raise NotImplementedError


class BinaryScores(ScoreLayout):
    """``scores`` is the probability of class 1; ``score >= 0.5`` predicts it."""

    def check(self, labels: np.ndarray, scores: np.ndarray) -> None:
        if scores.shape != labels.shape:
            raise ValueError(f"binary scores must have shape {labels.shape}, got {scores.shape}")
        if labels.min() < 0 or labels.max() > 1:
            raise ValueError("binary labels must be 0 or 1")

    def n_classes(self, scores: np.ndarray) -> int:
        return 2

    def predictions(self, scores: np.ndarray) -> np.ndarray:
        return (scores >= 0.5).astype(np.int64)

    def auc_target(self, labels: np.ndarray, scores: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(labels).to(torch.float64)

    def f1(self, per_class: torch.Tensor, present: torch.Tensor) -> float:
        # The positive class, as scikit-learn's default ``pos_label=1``.
        return float(per_class[1])


class MulticlassScores(ScoreLayout):
    """``scores`` is (N, K) class probabilities; the arg-max (first on ties) predicts."""

    def check(self, labels: np.ndarray, scores: np.ndarray) -> None:
        if scores.ndim != 2 or scores.shape[0] != len(labels) or scores.shape[1] < 2:
            raise ValueError(
                f"multiclass scores must have shape ({len(labels)}, K>=2), got {scores.shape}"
            )
        if labels.min() < 0 or labels.max() >= scores.shape[1]:
            raise ValueError(f"labels must be in 0..{scores.shape[1] - 1}")

    def n_classes(self, scores: np.ndarray) -> int:
        return int(scores.shape[1])

    def predictions(self, scores: np.ndarray) -> np.ndarray:
        return np.argmax(scores, axis=1).astype(np.int64)

    def auc_target(self, labels: np.ndarray, scores: np.ndarray) -> torch.Tensor:
        return _one_hot(labels, scores.shape[1])

    def f1(self, per_class: torch.Tensor, present: torch.Tensor) -> float:
        # Classes absent from both labels and predictions have no F1, and
        # scikit-learn leaves them out of the macro mean.
        return float(per_class[present].mean())


SCORE_LAYOUTS: Registry[ScoreLayout] = Registry(
    "classification task type", {"binary": BinaryScores(), "multiclass": MulticlassScores()}
)
"""The task types whose one label per slice is scored by :func:`classification_metrics`."""


def _check(layout: ScoreLayout, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """Validate shapes and values; fail loudly rather than score garbage."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError("labels must be integer class codes")
        labels = labels.astype(np.int64)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    layout.check(labels, scores)
    return labels.astype(np.int64), scores


def _one_hot(codes: np.ndarray, n_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(codes), n_classes).to(torch.float64)


def roc_auc(task_type: str, labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (binary) or macro one-vs-rest AUC (multi-class); NaN when undefined."""
    layout = SCORE_LAYOUTS[task_type]
    labels, scores = _check(layout, labels, scores)
    from monai.metrics import compute_roc_auc  # lazy: importing MONAI costs seconds

    pred = torch.from_numpy(scores)
    target = layout.auc_target(labels, scores)
    with warnings.catch_warnings():
        # MONAI warns and returns NaN when a class is absent: NaN is the answer we want.
        warnings.simplefilter("ignore", UserWarning)
        value = float(compute_roc_auc(pred, target, average="macro"))
    return value if math.isfinite(value) else math.nan


def predictions(task_type: str, scores: np.ndarray) -> np.ndarray:
    """Hard class codes: ``score >= 0.5`` (binary) or the arg-max (multi-class)."""
    return SCORE_LAYOUTS[task_type].predictions(np.asarray(scores, dtype=np.float64))


def classification_metrics(task_type: str, labels: np.ndarray, scores: np.ndarray) -> dict:
    """``{"auc", "accuracy", "f1"}`` of one evaluation (see the module docstring)."""
    from monai.metrics import get_confusion_matrix  # lazy: importing MONAI costs seconds

    layout = SCORE_LAYOUTS[task_type]
    labels, scores = _check(layout, labels, scores)
    n_classes = layout.n_classes(scores)
    pred = layout.predictions(scores)
    # MONAI's confusion matrix is per sample (N, C, 4: tp, fp, tn, fn); sum over samples.
    matrix = get_confusion_matrix(_one_hot(pred, n_classes), _one_hot(labels, n_classes))
    matrix = matrix.to(torch.float64).sum(0)
    tp, fp, fn = matrix[:, 0], matrix[:, 1], matrix[:, 3]
    denominator = 2 * tp + fp + fn
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))
    return {
        "auc": roc_auc(task_type, labels, scores),
        "accuracy": float(np.mean(pred == labels)),
        "f1": layout.f1(f1, denominator > 0),
    }


def multilabel_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Mean AUC over labels, element-wise accuracy and macro F1 of a multi-label evaluation.

    ``labels`` and ``scores`` are (N, L): 0/1 targets and per-label
    probabilities. A label whose AUC is undefined in this split (all positive or
    all negative) is left out of the mean, as the ChestX-ray14 benchmarks do;
    the mean is NaN only when no label has an AUC. ``auc_per_label`` keeps every
    label's value (NaN where undefined) for the record.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 2 or labels.shape != scores.shape or len(labels) == 0:
        raise ValueError(
            f"multilabel labels and scores must both be (N>0, L), got {labels.shape} "
            f"and {scores.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("multilabel labels must be 0 or 1")
    labels = labels.astype(np.int64)
    per_label = [roc_auc("binary", labels[:, j], scores[:, j]) for j in range(labels.shape[1])]
    defined = [value for value in per_label if math.isfinite(value)]
    pred = (scores >= 0.5).astype(np.int64)
    tp = ((pred == 1) & (labels == 1)).sum(0)
    fp = ((pred == 1) & (labels == 0)).sum(0)
    fn = ((pred == 0) & (labels == 1)).sum(0)
    denominator = 2 * tp + fp + fn
    present = denominator > 0
    f1 = float(np.mean(2 * tp[present] / denominator[present])) if present.any() else 0.0
    return {
        "auc": float(np.mean(defined)) if defined else math.nan,
        "accuracy": float(np.mean(pred == labels)),
        "f1": f1,
        "auc_per_label": per_label,
    }


def segmentation_metrics(
    masks: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor
) -> dict[str, float]:
    """Mean per-slice Dice and IoU of binary masks (N, H, W) against probabilities >= 0.5.

    MONAI's ``DiceMetric``/``MeanIoU`` with ``ignore_empty=False``: a slice whose
    ground truth is empty scores 1 when the prediction is empty too and 0
    otherwise, so false positives on background slices count against a model.
    """
    from monai.metrics import DiceMetric, MeanIoU  # lazy: importing MONAI costs seconds

    target = torch.as_tensor(masks)
    prob = torch.as_tensor(probs, dtype=torch.float32)
    if target.ndim != 3 or target.shape != prob.shape or len(target) == 0:
        raise ValueError(
            f"masks and probabilities must both be (N>0, H, W), got {tuple(target.shape)} "
            f"and {tuple(prob.shape)}"
        )
    if not torch.isfinite(prob).all():
        raise ValueError("segmentation probabilities are NaN or infinite")
    y = (target > 0).float().unsqueeze(1)
    y_pred = (prob >= 0.5).float().unsqueeze(1)
    dice = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)
    iou = MeanIoU(include_background=True, reduction="mean", ignore_empty=False)
    return {"dice": float(dice(y_pred, y).mean()), "iou": float(iou(y_pred, y).mean())}
