"""Metrics must match scikit-learn's and MONAI's definitions; never invent an AUC or a free Dice.

Thresholds are chosen on hand-made scores, degenerate answers are flagged, and
the predictions file reproduces the metrics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from medssl.core.registry import UnknownNameError
from medssl.finetuning.metrics import (
    SCORE_LAYOUTS,
    best_f1_threshold,
    case_counts,
    check_threshold_setting,
    choose_threshold,
    classification_flags,
    classification_metrics,
    load_predictions,
    metric_definitions,
    metrics_from_counts,
    multilabel_metrics,
    overlap_counts,
    predictions,
    save_predictions,
    segmentation_flags,
    segmentation_metrics,
    youden_threshold,
)
from medssl.finetuning.tasktypes import TASK_TYPES


@pytest.mark.parametrize("seed", range(5))
def test_binary_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    # Rounded scores create ties, which both implementations must count as half.
    scores = np.round(np.clip(0.3 * labels + rng.random(200) * 0.7, 0, 1), 2)
    got = classification_metrics("binary", labels, scores, threshold=0.4)
    pred = (scores >= 0.4).astype(int)
    assert got["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, pred), abs=1e-12)
    assert got["f1"] == pytest.approx(f1_score(labels, pred), abs=1e-12)
    expected = balanced_accuracy_score(labels, pred)
    assert got["balanced_accuracy"] == pytest.approx(expected, abs=1e-12)


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
    expected = balanced_accuracy_score(labels, pred)
    assert got["balanced_accuracy"] == pytest.approx(expected, abs=1e-12)


def test_balanced_accuracy_of_a_majority_answer_is_one_half() -> None:
    """Predicting the majority class everywhere: accuracy = its share, balanced accuracy 0.5."""
    labels = np.array([0] * 7 + [1] * 3)
    got = classification_metrics("binary", labels, np.full(10, 0.2), threshold=0.5)
    assert got["accuracy"] == pytest.approx(0.7)
    assert got["balanced_accuracy"] == pytest.approx(0.5)
    assert got["f1"] == 0.0
    # Hand-made: 2 of 3 positives and 5 of 7 negatives right: (2/3 + 5/7) / 2.
    scores = np.array([0.9, 0.8, 0.1, 0.7, 0.6, 0.2, 0.2, 0.2, 0.2, 0.2])
    got = classification_metrics("binary", np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0]), scores)
    assert got["balanced_accuracy"] == pytest.approx((2 / 3 + 5 / 7) / 2)


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
    """One slice per case (no case ids): an empty-vs-empty slice is excluded, not a free 1."""
    truth = np.zeros((3, 4, 4), dtype=bool)
    truth[0, :2] = True  # 8 pixels
    truth[1, 0, 0] = True
    probs = np.zeros((3, 4, 4))
    probs[0, :1] = 0.9  # 4 of 8 found: Dice 2*4/12, IoU 4/8
    probs[1, 3, 3] = 0.7  # a miss: 0
    # slice 2: nothing in either: excluded and counted
    values = segmentation_metrics(truth, probs)
    assert values["dice"] == pytest.approx((2 * 4 / 12 + 0) / 2)
    assert values["iou"] == pytest.approx((0.5 + 0) / 2)
    assert values["n_cases"] == 3 and values["n_cases_scored"] == 2
    assert values["n_cases_empty_reference"] == 1
    monai_rule = segmentation_metrics(truth, probs, empty_reference="empty_is_one")
    assert monai_rule["dice"] == pytest.approx((2 * 4 / 12 + 0 + 1) / 3)


def hand_cohort() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two patients of two 2x4 slices each (references, probabilities, patient per slice).

    A1: reference 4 px, 2 of them predicted (I 2, P 2, R 4); A2: empty and nothing predicted;
    B1: reference 2 px, 2 other px predicted (I 0, P 2, R 2); B2: 2 px, exactly found (I 2).
    """
    truth = np.zeros((4, 2, 4), dtype=np.uint8)
    probs = np.zeros((4, 2, 4))
    truth[0, 0, :4] = 1
    probs[0, 0, :2] = 0.8
    truth[2, 0, :2] = 1
    probs[2, 1, :2] = 0.9
    truth[3, 1, 2:] = 1
    probs[3, 1, 2:] = 0.6
    return truth, probs, np.array(["A", "A", "B", "B"])


def test_per_case_per_slice_and_global_dice_by_hand() -> None:
    truth, probs, cases = hand_cohort()
    values = segmentation_metrics(truth, probs, cases)
    # Case A: I 2, P 2, R 4 -> 4/6; case B: I 2, P 4, R 4 -> 4/8.
    assert values["dice"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert values["iou"] == pytest.approx((2 / 4 + 2 / 6) / 2)
    assert values["dice_global"] == pytest.approx(2 * 4 / (6 + 8))
    # Slices A1 2/3, B1 0, B2 1; A2 (empty reference) excluded.
    assert values["dice_slice"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert values["n_cases"] == 2 and values["n_cases_empty_reference"] == 0
    # The former per-slice rule (empty vs empty = 1) would have said 2/3 here.
    old = segmentation_metrics(truth, probs, cases, "empty_is_one")["dice_slice"]
    assert old == pytest.approx((2 / 3 + 1 + 0 + 1) / 4)


def test_per_case_dice_equals_monai_on_each_case_volume() -> None:
    from monai.metrics import DiceMetric, compute_iou

    rng = np.random.default_rng(4)
    truth = rng.random((9, 8, 8)) < 0.3
    truth[6:] = False  # patient C: no reference foreground anywhere
    probs = rng.random((9, 8, 8))
    cases = np.repeat(["A", "B", "C"], 3)
    values = segmentation_metrics(truth, probs, cases)
    dice, iou = [], []
    for case in ("A", "B"):
        # A case's slices as one volume (1, 1, S, H, W), ignore_empty as in MONAI.
        y = torch.from_numpy(truth[cases == case]).float()[None, None]
        y_pred = torch.from_numpy(probs[cases == case] >= 0.5).float()[None, None]
        dice.append(float(DiceMetric(include_background=True, ignore_empty=True)(y_pred, y)))
        iou.append(float(compute_iou(y_pred, y, include_background=True, ignore_empty=True)))
    assert values["dice"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert values["iou"] == pytest.approx(np.mean(iou), abs=1e-6)
    assert values["n_cases_scored"] == 2 and values["n_cases_empty_reference"] == 1


def test_predicting_nothing_scores_zero_and_is_flagged() -> None:
    """The degenerate answer that the per-slice rule rewarded: Dice 0 where there is tumour."""
    truth, _, cases = hand_cohort()
    truth = np.concatenate([truth, np.zeros((2, 2, 4), dtype=np.uint8)])  # patient C: empty
    cases = np.append(cases, ["C", "C"])
    nothing = np.zeros(truth.shape)
    counts = overlap_counts(truth, nothing)
    values = metrics_from_counts(counts, cases, "exclude")
    assert values["dice"] == 0 and values["iou"] == 0 and values["dice_global"] == 0
    assert values["n_cases_scored"] == 2 and values["n_cases_empty_reference"] == 1
    assert segmentation_flags(nothing, counts) == ["constant_prediction", "empty_prediction"]
    # Under score_zero_if_predicted C stays out too (nothing predicted there); a false
    # positive on C would cost: C then scores 0.
    assert metrics_from_counts(counts, cases, "score_zero_if_predicted")["n_cases_scored"] == 2
    stray = nothing.copy()
    stray[4, 0, 0] = 0.9
    strict = segmentation_metrics(truth, stray, cases, "score_zero_if_predicted")
    assert strict["n_cases_scored"] == 3 and strict["dice"] == 0
    everything = np.ones(truth.shape)
    full = overlap_counts(truth, everything)
    assert segmentation_flags(everything * 0.7, full) == ["constant_prediction", "full_prediction"]


def test_undefined_dice_when_no_case_has_foreground() -> None:
    truth = np.zeros((2, 4, 4))
    values = segmentation_metrics(truth, np.zeros((2, 4, 4)), np.array(["A", "B"]))
    assert math.isnan(values["dice"]) and math.isnan(values["dice_global"])
    assert values["n_cases_scored"] == 0


def test_youden_and_best_f1_thresholds_on_hand_made_scores() -> None:
    """Positives 0.5 and 0.9 among negatives 0.1, 0.2, 0.3, 0.6, 0.7.

    At t = 0.5: sensitivity 1, specificity 3/5, J = 0.6, the largest. F1 is 2/3 at both
    t = 0.9 (1 TP, 0 FP) and t = 0.5 (2 TP, 2 FP); ties go to the higher threshold.
    """
    labels = np.array([0, 0, 0, 1, 0, 0, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.9])
    assert youden_threshold(labels, scores) == 0.5
    assert best_f1_threshold(labels, scores) == 0.9
    assert choose_threshold("youden", labels, scores) == 0.5
    assert choose_threshold(0.25, labels, scores) == 0.25
    assert youden_threshold(np.zeros(4, dtype=int), scores[:4]) is None
    assert best_f1_threshold(np.zeros(4, dtype=int), scores[:4]) is None
    assert youden_threshold(np.ones(4, dtype=int), scores[:4]) is None


@pytest.mark.parametrize("seed", range(3))
def test_youden_threshold_reaches_the_largest_j_of_the_roc_curve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 80)
    scores = np.round(0.3 * labels + 0.7 * rng.random(80), 2)  # ties included
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    threshold = youden_threshold(labels, scores)
    pred = scores >= threshold
    j = pred[labels == 1].mean() - pred[labels == 0].mean()
    assert j == pytest.approx(np.max(tpr - fpr), abs=1e-12)


def test_threshold_setting_is_checked() -> None:
    assert check_threshold_setting("best_f1") == "best_f1"
    assert check_threshold_setting(1) == 1.0
    with pytest.raises(UnknownNameError, match="did you mean 'youden'"):
        check_threshold_setting("youdem")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        check_threshold_setting(1.5)
    with pytest.raises(ValueError, match="rule name or a number"):
        check_threshold_setting(True)


def test_constant_and_single_class_predictions_are_flagged() -> None:
    constant = np.full(6, 0.3)
    assert classification_flags(constant, constant >= 0.3) == [
        "constant_prediction",
        "single_class_predicted",
    ]
    varied = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.25])
    assert classification_flags(varied, (varied >= 0.5).astype(int)) == ["single_class_predicted"]
    assert classification_flags(varied, (varied >= 0.3).astype(int)) == []
    nearly = 0.3 + np.arange(6) * 1e-9  # a collapsed network: float noise only
    assert "constant_prediction" in classification_flags(nearly, np.arange(6) % 2)
    rows = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    assert classification_flags(rows, rows.argmax(1)) == []
    assert classification_flags(rows, np.array([[1, 0], [1, 0], [1, 0]])) == [
        "single_class_predicted"
    ]


def test_predictions_file_round_trips_and_reproduces_the_metrics(tmp_path) -> None:
    truth, probs, cases = hand_cohort()
    counts = overlap_counts(truth, probs)
    ids, per_case = case_counts(counts, cases)
    arrays = {
        "case_id": ids,
        "intersection": per_case.intersection,
        "pred_sum": per_case.pred_sum,
        "ref_sum": per_case.ref_sum,
        "patient_id": cases,
        "slice_intersection": counts.intersection,
        "slice_pred_sum": counts.pred_sum,
        "slice_ref_sum": counts.ref_sum,
        "pixels_per_slice": np.int64(counts.pixels_per_slice),
        "scores": np.linspace(0, 1, 4),
    }
    path = tmp_path / "run" / "test_predictions.npz"
    save_predictions(path, arrays)
    loaded = load_predictions(path)
    assert set(loaded) == set(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype == np.asarray(array).dtype, name
    # Plain numpy reads it without pickles; identical content gives identical bytes.
    with np.load(path, allow_pickle=False) as archive:
        assert archive["case_id"].tolist() == ["A", "B"]
    first = path.read_bytes()
    save_predictions(tmp_path / "again.npz", arrays)
    assert (tmp_path / "again.npz").read_bytes() == first
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".part")]
    again = type(counts)(
        loaded["slice_intersection"],
        loaded["slice_pred_sum"],
        loaded["slice_ref_sum"],
        int(loaded["pixels_per_slice"]),
    )
    assert metrics_from_counts(again, loaded["patient_id"], "exclude") == (
        segmentation_metrics(truth, probs, cases)
    )
    with pytest.raises(ValueError, match="Python objects"):
        save_predictions(tmp_path / "bad.npz", {"ids": np.array(["a", 1], dtype=object)})
    (tmp_path / "broken.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="broken.npz: not a predictions file"):
        load_predictions(tmp_path / "broken.npz")


def test_every_metric_has_a_definition() -> None:
    names = ("auc", "accuracy", "f1", "balanced_accuracy", "dice", "dice_global", "iou")
    texts = metric_definitions(names, "youden", "exclude")
    assert set(texts) == set(names)
    assert "per" not in texts["dice_global"] and "one patient's test slices" in texts["dice"]
    assert "'youden' rule" in texts["f1"] and "left out of the mean" in texts["dice"]


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
    cuts = np.array([0.3, 0.5, 0.7, 0.9])  # one threshold per label
    per_label = multilabel_metrics(labels, scores, cuts)
    pred = (scores >= cuts).astype(int)
    assert per_label["accuracy"] == pytest.approx(np.mean(pred == labels))
    assert per_label["f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
