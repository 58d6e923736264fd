"""Which way is better for each metric.

One table serves fine-tuning's model selection and the statistics' choice of
the best initialisation, so the two can never disagree. It lives in its own
module because both sides import it: the statistics stage must not pull in
torch for a dictionary.
"""

from __future__ import annotations

METRIC_DIRECTION: dict[str, str] = {
    "auc": "higher",
    "mean_auc": "higher",
    "accuracy": "higher",
    "balanced_accuracy": "higher",
    "f1": "higher",
    "macro_f1": "higher",
    "dice": "higher",
    "iou": "higher",
    "jaccard": "higher",
    "precision": "higher",
    "recall": "higher",
    "sensitivity": "higher",
    "specificity": "higher",
    "loss": "lower",
    "nll": "lower",
    "brier": "lower",
    "ece": "lower",
    "hd95": "lower",
}
"""Which way is better for each metric; a metric missing here is an error, not a guess."""

HIGHER_IS_BETTER: dict[str, bool] = {
    name: way == "higher" for name, way in METRIC_DIRECTION.items()
}
"""The same table as booleans, for model selection."""

METRIC_RANGE: dict[str, tuple[float, float]] = {
    name: (0.0, 1.0)
    for name in (
        "auc",
        "mean_auc",
        "accuracy",
        "balanced_accuracy",
        "f1",
        "macro_f1",
        "dice",
        "dice_global",
        "iou",
        "jaccard",
        "precision",
        "recall",
        "sensitivity",
        "specificity",
        "brier",
        "ece",
    )
}
"""The range a metric can take where it has one; intervals drawn outside it are clipped
(a Dice band from -0.3 to 2.0 shows a t interval's arithmetic, not possible Dice values)."""

LOGIT_METRICS: frozenset[str] = frozenset(
    {"auc", "mean_auc", "accuracy", "balanced_accuracy", "f1", "macro_f1", "dice",
     "dice_global", "iou", "jaccard"}
)  # fmt: skip
"""Bounded "higher is better" scores whose label-efficiency slope is fitted on the logit
scale: near the ceiling of 1 a raw slope shrinks for any init, whatever its efficiency."""


def metric_range(metric: str) -> tuple[float, float] | None:
    """``(low, high)`` of a metric with a range, None for an unbounded one (loss, hd95)."""
    return METRIC_RANGE.get(metric)
