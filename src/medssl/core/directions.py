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
