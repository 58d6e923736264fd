"""Metrics of one evaluation, the decision thresholds behind them, degenerate-run flags,
and the test predictions file.

Classification (binary, multi-class, multi-label)
-------------------------------------------------
MONAI's implementations are used (``compute_roc_auc``, ``get_confusion_matrix``)
so the numbers match what the medical-imaging community reports with the same
library; the tests pin them to scikit-learn's definitions.

* binary: ``scores`` is the probability of class 1 and the prediction is
  ``score >= threshold``. The threshold is chosen on the validation split's
  predictions of the selected checkpoint (:func:`choose_threshold`: ``youden``
  maximises sensitivity + specificity - 1, ``best_f1`` the positive class's F1,
  or a fixed number) and then applied unchanged to the test split. A fixed 0.5
  on a model trained on rare positives turns accuracy into the majority share
  and F1 into 0 however well the scores rank, which is why it is not the
  default. AUC and F1 are those of the positive class; ``balanced_accuracy``
  is the mean recall over the classes present in the labels (scikit-learn's
  ``balanced_accuracy_score``).
* multi-class: ``scores`` is (N, K) class probabilities and the prediction is
  the arg-max (first class on ties); no threshold. AUC is the macro
  one-vs-rest mean, F1 the macro mean over the classes present in the labels
  or the predictions, balanced accuracy as above.
* multi-label (:func:`multilabel_metrics`): one threshold per label, chosen on
  validation like the binary one; mean AUC over the labels whose AUC is
  defined, element-wise accuracy, macro F1.
* an undefined metric (an AUC of a split without one of the classes) is NaN,
  never a substitute number, so a downstream mean cannot silently include it.

Segmentation (:func:`segmentation_metrics`)
-------------------------------------------
A *case* is one patient's test slices taken together as one volume (as
nnU-Net and MONAI report volumes). Per slice, the thresholded prediction
(probability >= 0.5) gives the intersection with the reference, the predicted
and the reference foreground counts; a case's counts are the sums over its
slices.

* ``dice``: the mean over cases of 2 I / (P + R), the case's Dice;
* ``iou``: the mean over cases of I / (P + R - I);
* ``dice_global``: 2 sum(I) / (sum(P) + sum(R)) over the whole split;
* ``dice_slice``, ``iou_slice`` (recorded beside the test metrics, not tabled):
  the same means over single slices instead of cases.

A case (or slice) whose reference is empty has no Dice of its own; what it
counts for is the stated rule ``empty_reference`` (:data:`EMPTY_REFERENCE_RULES`):
``exclude`` (default: left out of the mean and counted), ``score_zero_if_predicted``
(0 when anything is predicted, else left out: a false positive costs, an empty
answer earns nothing) or ``empty_is_one`` (MONAI's ``ignore_empty=False``: 1 when
nothing is predicted, else 0). Under ``empty_is_one`` a model that predicts
nothing anywhere scores the share of empty cases; it is there to reproduce
numbers reported that way, never the default.

Flags (:func:`classification_flags`, :func:`segmentation_flags`)
----------------------------------------------------------------
Strings naming a degenerate outcome, empty when the run looks sound:
``constant_prediction`` (every test score equal within :data:`CONSTANT_TOLERANCE`),
``single_class_predicted`` (every thresholded or arg-max prediction the same),
``empty_prediction`` (no foreground predicted on any test slice),
``full_prediction`` (foreground on every pixel of every test slice) and
``undefined_metric:<name>``.

Test predictions file (:func:`save_predictions`, :func:`load_predictions`)
--------------------------------------------------------------------------
``test_predictions.npz`` beside the run's ``metrics.json`` (``test_predictions_seed<s>.npz``
when one job runs several seeds; the run's ``test_predictions`` key names its
file). A NumPy ``.npz`` archive (``numpy.load(path)``; no pickled objects, so
``allow_pickle=False`` reads it), one row per test sample in HDF5 row order:

* classification: ``sample_index`` (int64, HDF5 row), ``patient_id`` (str),
  ``labels`` (int64; (N,) class codes, or (N, L) 0/1 for multi-label),
  ``scores`` (float64; (N,) probability of class 1, (N, K) class probabilities
  or (N, L) label probabilities), ``predictions`` (int64, the same shape as
  ``labels``: what accuracy and F1 counted), ``threshold`` (float64; () binary,
  (L,) multi-label, NaN for arg-max);
* segmentation, per case (sorted by ``case_id``): ``case_id`` (str, the
  patient id), ``intersection``, ``pred_sum``, ``ref_sum`` (int64 pixel
  counts); per slice: ``sample_index``, ``patient_id``, ``slice_intersection``,
  ``slice_pred_sum``, ``slice_ref_sum``; and ``pixels_per_slice`` (int64 ()).

Every metric above can be recomputed from the file (the tests do), which is
what a patient-level bootstrap of the test set or a paired AUC test needs.
The archive is written atomically with fixed member timestamps, so identical
runs write identical bytes.
"""

from __future__ import annotations

import io
import math
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.core.files import write_bytes
from medssl.core.registry import Registry, look_up

CONSTANT_TOLERANCE = 1e-6
"""Scores whose range across test samples is at most this are a constant prediction.

Probabilities live in [0, 1]; a collapsed network gives the same output up to
float rounding (~1e-7 for float32), while any model that ranks differs by far more.
"""

SEGMENTATION_THRESHOLD = 0.5
"""Pixel probability at which a pixel is foreground (not tuned: Dice is not a ranking)."""

# --------------------------------------------------------------------------- thresholds


def _threshold_table(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each distinct score as a threshold (``score >= t`` positive), with its TP and FP counts.

    Thresholds come out in descending order. Written with NumPy because neither
    MONAI nor torch chooses a threshold, and scikit-learn is not a dependency.
    """
    order = np.argsort(-scores, kind="stable")
    ordered, positive = scores[order], labels[order]
    tp = np.cumsum(positive)
    fp = np.cumsum(1 - positive)
    last = np.append(np.flatnonzero(np.diff(ordered) != 0), len(ordered) - 1)
    return ordered[last], tp[last], fp[last]


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The threshold maximising Youden's J (sensitivity + specificity - 1); None when undefined.

    Candidates are the distinct scores (positive when ``score >= t``); among
    equal J the highest threshold wins (the fewest positive calls). J is
    undefined when the labels hold one class.
    """
    labels, scores = _binary_inputs(labels, scores)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    thresholds, tp, fp = _threshold_table(labels, scores)
    # J * n_pos * n_neg in integers: equal J compare equal, so the tie rule holds exactly.
    scaled = tp * n_neg - fp * n_pos
    return float(thresholds[int(np.argmax(scaled))])


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The threshold maximising the positive class's F1; None when there is no positive.

    Candidates and the tie rule as :func:`youden_threshold`.
    """
    labels, scores = _binary_inputs(labels, scores)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return None
    thresholds, tp, fp = _threshold_table(labels, scores)
    # F1 = 2 TP / (TP + FP + n_pos); equal fractions of integers divide to equal floats.
    f1 = 2 * tp / (tp + fp + n_pos)
    return float(thresholds[int(np.argmax(f1))])


THRESHOLD_RULES: Registry[Callable[[np.ndarray, np.ndarray], float | None]] = Registry(
    "threshold rule", {"youden": youden_threshold, "best_f1": best_f1_threshold}
)
"""``finetune.threshold`` by name; a number instead fixes the threshold."""


def check_threshold_setting(value: object) -> str | float:
    """``finetune.threshold``: a rule name of :data:`THRESHOLD_RULES` or a number in [0, 1]."""
    if isinstance(value, bool):
        raise ValueError(f"finetune.threshold must be a rule name or a number, got {value!r}")
    if isinstance(value, int | float):
        if not 0 <= float(value) <= 1:
            raise ValueError(f"finetune.threshold must be in [0, 1], got {value}")
        return float(value)
    return look_up("finetune.threshold", value, THRESHOLD_RULES.names())


def choose_threshold(setting: str | float, labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The threshold of ``setting`` on these (validation) predictions; None when undefined."""
    setting = check_threshold_setting(setting)
    if isinstance(setting, float):
        return setting
    return THRESHOLD_RULES[setting](labels, scores)


def _binary_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape or len(labels) == 0:
        raise ValueError(
            f"labels and scores must both be (N>0,), got {labels.shape} and {scores.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("binary labels must be 0 or 1")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    return labels.astype(np.int64), scores


# --------------------------------------------------------------------------- classification


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

    def predictions(self, scores: np.ndarray, threshold: float | None) -> np.ndarray:
        """Hard class codes of ``scores``."""
        raise NotImplementedError

    def auc_target(self, labels: np.ndarray, scores: np.ndarray) -> torch.Tensor:
        """MONAI ``compute_roc_auc``'s target for these labels (same shape as ``scores``)."""
        raise NotImplementedError

    def f1(self, per_class: torch.Tensor, present: torch.Tensor) -> float:
        """The reported F1 from per-class F1 and the classes present in labels or predictions."""
        raise NotImplementedError


class BinaryScores(ScoreLayout):
    """``scores`` is the probability of class 1; ``score >= threshold`` predicts it."""

    def check(self, labels: np.ndarray, scores: np.ndarray) -> None:
        if scores.shape != labels.shape:
            raise ValueError(f"binary scores must have shape {labels.shape}, got {scores.shape}")
        if labels.min() < 0 or labels.max() > 1:
            raise ValueError("binary labels must be 0 or 1")

    def n_classes(self, scores: np.ndarray) -> int:
        return 2

    def predictions(self, scores: np.ndarray, threshold: float | None) -> np.ndarray:
        if threshold is None:
            raise ValueError("binary predictions need a threshold")
        return (scores >= threshold).astype(np.int64)

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

    def predictions(self, scores: np.ndarray, threshold: float | None) -> np.ndarray:
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


def predictions(task_type: str, scores: np.ndarray, threshold: float | None = 0.5) -> np.ndarray:
    """Hard class codes: ``score >= threshold`` (binary) or the arg-max (multi-class)."""
    return SCORE_LAYOUTS[task_type].predictions(np.asarray(scores, dtype=np.float64), threshold)


def classification_metrics(
    task_type: str, labels: np.ndarray, scores: np.ndarray, threshold: float | None = 0.5
) -> dict[str, float]:
    """``{"auc", "accuracy", "f1", "balanced_accuracy"}`` of one evaluation.

    ``threshold`` is the binary decision threshold (ignored by the arg-max of
    multi-class); see the module docstring for each definition.
    """
    from monai.metrics import get_confusion_matrix  # lazy: importing MONAI costs seconds

    layout = SCORE_LAYOUTS[task_type]
    labels, scores = _check(layout, labels, scores)
    n_classes = layout.n_classes(scores)
    pred = layout.predictions(scores, threshold)
    # MONAI's confusion matrix is per sample (N, C, 4: tp, fp, tn, fn); sum over samples.
    matrix = get_confusion_matrix(_one_hot(pred, n_classes), _one_hot(labels, n_classes))
    matrix = matrix.to(torch.float64).sum(0)
    tp, fp, fn = matrix[:, 0], matrix[:, 1], matrix[:, 3]
    denominator = 2 * tp + fp + fn
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))
    in_labels = (tp + fn) > 0
    recall = tp[in_labels] / (tp + fn)[in_labels]
    return {
        "auc": roc_auc(task_type, labels, scores),
        "accuracy": float(np.mean(pred == labels)),
        "f1": layout.f1(f1, denominator > 0),
        "balanced_accuracy": float(recall.mean()),
    }


def multilabel_metrics(
    labels: np.ndarray, scores: np.ndarray, thresholds: float | np.ndarray = 0.5
) -> dict[str, Any]:
    """Mean AUC over labels, element-wise accuracy and macro F1 of a multi-label evaluation.

    ``labels`` and ``scores`` are (N, L): targets and per-label probabilities;
    ``thresholds`` is one threshold for all labels or one per label. Only
    entries whose target is exactly 0 or 1 are scored: an uncertain label left
    out (-1) or a soft training label in (0, 1) is not a ground truth, so it is
    excluded from that label's AUC, accuracy and F1 and counted in
    ``excluded_entries``. A label whose AUC is undefined in this split (all
    positive or all negative among its scored entries) is left out of the
    mean, as the ChestX-ray14 benchmarks do; the mean is NaN only when no label
    has an AUC. ``auc_per_label`` keeps every label's value (NaN where undefined).
    """
    labels, scores, known = _multilabel_inputs(labels, scores)
    per_label = [
        roc_auc("binary", labels[known[:, j], j], scores[known[:, j], j])
        if known[:, j].sum() > 1
        else math.nan
        for j in range(labels.shape[1])
    ]
    defined = [value for value in per_label if math.isfinite(value)]
    pred = multilabel_predictions(scores, thresholds)
    tp = ((pred == 1) & (labels == 1) & known).sum(0)
    fp = ((pred == 1) & (labels == 0) & known).sum(0)
    fn = ((pred == 0) & (labels == 1) & known).sum(0)
    denominator = 2 * tp + fp + fn
    present = denominator > 0
    f1 = float(np.mean(2 * tp[present] / denominator[present])) if present.any() else 0.0
    accuracy = float(np.mean((pred == labels)[known])) if known.any() else math.nan
    return {
        "auc": float(np.mean(defined)) if defined else math.nan,
        "accuracy": accuracy,
        "f1": f1,
        "auc_per_label": per_label,
        "excluded_entries": int((~known).sum()),
    }


def multilabel_predictions(scores: np.ndarray, thresholds: float | np.ndarray) -> np.ndarray:
    """0/1 predictions (N, L): ``score >= threshold`` of each label."""
    scores = np.asarray(scores, dtype=np.float64)
    cut = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), scores.shape[1:])
    return (scores >= cut).astype(np.int64)


def known_targets(labels: np.ndarray) -> np.ndarray:
    """Where a multilabel target is a ground truth (exactly 0 or 1), not -1 or soft."""
    return np.isin(np.asarray(labels, dtype=np.float64), (0.0, 1.0))


def _multilabel_inputs(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 2 or labels.shape != scores.shape or len(labels) == 0:
        raise ValueError(
            f"multilabel labels and scores must both be (N>0, L), got {labels.shape} "
            f"and {scores.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    known = known_targets(labels)
    allowed = known | (labels == -1) | ((labels > 0) & (labels < 1))
    if not allowed.all():
        raise ValueError("multilabel labels must be 0 or 1 (or -1 / a soft label, not scored)")
    return labels, scores, known


# --------------------------------------------------------------------------- segmentation


@dataclass(frozen=True)
class EmptyReferenceRule:
    """What a case or slice with an empty reference scores: ``if_predicted`` when the
    prediction has foreground, ``if_empty`` when it has none; NaN = left out of the mean."""

    if_predicted: float
    if_empty: float
    description: str


EMPTY_REFERENCE_RULES: Registry[EmptyReferenceRule] = Registry(
    "empty-reference rule",
    {
        "exclude": EmptyReferenceRule(
            math.nan, math.nan, "cases with an empty reference are left out of the mean"
        ),
        "score_zero_if_predicted": EmptyReferenceRule(
            0.0,
            math.nan,
            "a case with an empty reference scores 0 when anything is predicted "
            "and is left out of the mean otherwise",
        ),
        "empty_is_one": EmptyReferenceRule(
            0.0,
            1.0,
            "a case with an empty reference scores 1 when nothing is predicted and 0 otherwise "
            "(MONAI ignore_empty=False)",
        ),
    },
)
"""``finetune.empty_reference``: how a case without reference foreground counts."""


@dataclass(frozen=True)
class OverlapCounts:
    """Pixel counts of a thresholded prediction against the reference, per slice."""

    intersection: np.ndarray
    pred_sum: np.ndarray
    ref_sum: np.ndarray
    pixels_per_slice: int


def overlap_counts(
    masks: np.ndarray | torch.Tensor,
    probs: np.ndarray | torch.Tensor,
    threshold: float = SEGMENTATION_THRESHOLD,
) -> OverlapCounts:
    """Per-slice intersection, predicted and reference foreground of masks (N, H, W)."""
    target = torch.as_tensor(masks)
    prob = torch.as_tensor(probs, dtype=torch.float32)
    if target.ndim != 3 or target.shape != prob.shape or len(target) == 0:
        raise ValueError(
            f"masks and probabilities must both be (N>0, H, W), got {tuple(target.shape)} "
            f"and {tuple(prob.shape)}"
        )
    if not torch.isfinite(prob).all():
        raise ValueError("segmentation probabilities are NaN or infinite")
    reference = target > 0
    predicted = prob >= threshold
    return OverlapCounts(
        intersection=(reference & predicted).sum((1, 2)).to(torch.int64).numpy(),
        pred_sum=predicted.sum((1, 2)).to(torch.int64).numpy(),
        ref_sum=reference.sum((1, 2)).to(torch.int64).numpy(),
        pixels_per_slice=int(target.shape[1] * target.shape[2]),
    )


def case_counts(counts: OverlapCounts, case_ids: np.ndarray) -> tuple[np.ndarray, OverlapCounts]:
    """The sorted distinct case ids and each case's counts (sums over its slices)."""
    case_ids = np.asarray(case_ids).astype(str)
    if case_ids.shape != counts.intersection.shape:
        raise ValueError(
            f"{len(case_ids)} case ids for {len(counts.intersection)} slices: one id per slice"
        )
    cases, inverse = np.unique(case_ids, return_inverse=True)

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(inverse, weights=values, minlength=len(cases)).astype(np.int64)

    summed = OverlapCounts(
        total(counts.intersection),
        total(counts.pred_sum),
        total(counts.ref_sum),
        counts.pixels_per_slice,
    )
    return cases, summed


def overlap_scores(counts: OverlapCounts, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU of each row of ``counts``; rows with an empty reference follow ``rule``.

    NaN marks a row left out of the mean. Computed from the counts rather
    than with MONAI's ``DiceMetric``: cases hold different numbers of slices
    (one MONAI call per case), and computing from the counts that the
    predictions file stores makes the file reproduce the metrics exactly.
    The tests pin the values to ``DiceMetric`` on each case's volume.
    """
    empty = EMPTY_REFERENCE_RULES[rule]
    inter = counts.intersection.astype(np.float64)
    total = (counts.pred_sum + counts.ref_sum).astype(np.float64)
    has_ref = counts.ref_sum > 0
    on_empty = np.where(counts.pred_sum > 0, empty.if_predicted, empty.if_empty)
    # With a reference, P + R - I >= R > 0; the placeholder 1 only avoids 0/0 on empty rows.
    dice = np.where(has_ref, 2 * inter / np.where(has_ref, total, 1.0), on_empty)
    iou = np.where(has_ref, inter / np.where(has_ref, total - inter, 1.0), on_empty)
    return dice, iou


def _nanmean(values: np.ndarray) -> float:
    """Mean of the defined values; NaN when none is (no warning, unlike ``np.nanmean``)."""
    defined = values[np.isfinite(values)]
    return float(defined.mean()) if len(defined) else math.nan


def global_dice(counts: OverlapCounts) -> float:
    """2 sum(I) / (sum(P) + sum(R)) over every slice; NaN when both sums are 0."""
    total = int(counts.pred_sum.sum() + counts.ref_sum.sum())
    return 2 * int(counts.intersection.sum()) / total if total else math.nan


def segmentation_metrics(
    masks: np.ndarray | torch.Tensor,
    probs: np.ndarray | torch.Tensor,
    case_ids: np.ndarray | None = None,
    empty_reference: str = "exclude",
) -> dict[str, float]:
    """Per-case Dice and IoU, global Dice, per-slice Dice and IoU, and case counts.

    ``masks`` (N, H, W) are the references, ``probs`` the probabilities
    (foreground at >= 0.5), ``case_ids`` one id per slice (the patient; each
    slice is its own case when omitted). Keys: ``dice``, ``iou``, ``dice_global``,
    ``dice_slice``, ``iou_slice``, ``n_cases``, ``n_cases_scored`` (in the
    mean), ``n_cases_empty_reference``; see the module docstring.
    """
    counts = overlap_counts(masks, probs)
    return metrics_from_counts(counts, case_ids, empty_reference)


def metrics_from_counts(
    counts: OverlapCounts, case_ids: np.ndarray | None, empty_reference: str
) -> dict[str, float]:
    """:func:`segmentation_metrics` from per-slice counts (what the predictions file holds)."""
    if case_ids is None:
        case_ids = np.arange(len(counts.intersection)).astype(str)
    _, per_case = case_counts(counts, case_ids)
    case_dice, case_iou = overlap_scores(per_case, empty_reference)
    slice_dice, slice_iou = overlap_scores(counts, empty_reference)
    return {
        "dice": _nanmean(case_dice),
        "iou": _nanmean(case_iou),
        "dice_global": global_dice(counts),
        "dice_slice": _nanmean(slice_dice),
        "iou_slice": _nanmean(slice_iou),
        "n_cases": len(case_dice),
        "n_cases_scored": int(np.isfinite(case_dice).sum()),
        "n_cases_empty_reference": int((per_case.ref_sum == 0).sum()),
    }


# --------------------------------------------------------------------------- flags


def is_constant(scores: np.ndarray | torch.Tensor, tolerance: float = CONSTANT_TOLERANCE) -> bool:
    """True when every sample's scores equal every other's within ``tolerance``."""
    values = torch.as_tensor(scores, dtype=torch.float64)
    if len(values) < 2:
        return False
    spread = values.amax(0) - values.amin(0)
    return bool(spread.max() <= tolerance)


def undefined_flags(metrics: Mapping[str, Any], names: tuple[str, ...]) -> list[str]:
    """``undefined_metric:<name>`` for each of ``names`` whose value is NaN."""
    return [
        f"undefined_metric:{name}"
        for name in names
        if isinstance(metrics.get(name), float) and math.isnan(metrics[name])
    ]


def classification_flags(scores: np.ndarray, predicted: np.ndarray) -> list[str]:
    """``constant_prediction`` and ``single_class_predicted`` of one classification split.

    A prediction is one row of ``predicted`` (a class code, or a multi-label
    0/1 vector): the flag is raised when every sample gets the same one.
    """
    flags = []
    if is_constant(scores):
        flags.append("constant_prediction")
    rows = np.asarray(predicted).reshape(len(predicted), -1)
    if len(np.unique(rows, axis=0)) == 1:
        flags.append("single_class_predicted")
    return flags


def segmentation_flags(probs: np.ndarray | torch.Tensor, counts: OverlapCounts) -> list[str]:
    """``constant_prediction``, ``empty_prediction`` and ``full_prediction`` of one split."""
    flags = []
    if is_constant(torch.as_tensor(probs).reshape(1, -1).T):
        flags.append("constant_prediction")
    if int(counts.pred_sum.sum()) == 0:
        flags.append("empty_prediction")
    if bool((counts.pred_sum == counts.pixels_per_slice).all()):
        flags.append("full_prediction")
    return flags


# --------------------------------------------------------------------------- definitions


def metric_definitions(
    names: tuple[str, ...], threshold: str | float, empty_reference: str
) -> dict[str, str]:
    """One sentence per metric of ``names``: exactly what its number is (for metrics.json)."""
    if isinstance(threshold, str):
        cut = f"a threshold chosen on the validation split by the {threshold!r} rule"
    else:
        cut = f"the fixed threshold {threshold}"
    empty = EMPTY_REFERENCE_RULES[empty_reference].description
    case = "a case is one patient's test slices taken together as one volume"
    texts = {
        "auc": "ROC AUC of the scores (multi-class: macro one-vs-rest mean; multi-label: "
        "mean over the labels whose AUC is defined)",
        "accuracy": f"share of correct predictions; binary and multi-label at {cut} "
        "(multi-label: per label), multi-class by arg-max; multi-label: element-wise",
        "f1": f"F1 of the positive class at {cut}; multi-class: macro mean by arg-max; "
        "multi-label: macro mean over labels",
        "balanced_accuracy": f"mean recall over the classes present in the labels; binary at "
        f"{cut}, multi-class by arg-max",
        "dice": f"mean over cases of the case's Dice 2|P∩R|/(|P|+|R|) at probability >= "
        f"{SEGMENTATION_THRESHOLD}; {case}; {empty}",
        "iou": f"mean over cases of the case's IoU |P∩R|/|P∪R|; {case}; {empty}",
        "dice_global": "Dice of all test pixels pooled: 2 sum|P∩R| / (sum|P| + sum|R|)",
        "dice_slice": f"mean over slices of the slice's Dice (each slice its own case); {empty}",
        "iou_slice": f"mean over slices of the slice's IoU; {empty}",
    }
    return {name: texts[name] for name in names}


# --------------------------------------------------------------------------- predictions file


def save_predictions(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as an ``.npz`` archive at ``path``, atomically, with fixed bytes.

    ``numpy.savez`` stamps each member with the current time, so two identical
    runs would write different files; the archive is built here with a fixed
    timestamp instead, in memory, and written through :func:`medssl.core.files.write_bytes`.
    Object arrays are refused (a reader would need ``allow_pickle``).
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            array = np.asarray(arrays[name])
            if array.dtype == object:
                raise ValueError(f"{path}: array {name!r} holds Python objects, not str or numbers")
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, array, allow_pickle=False)
    write_bytes(path, buffer.getvalue())


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a predictions file (:func:`save_predictions`), by name."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a predictions file ({err})") from err
