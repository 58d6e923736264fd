"""The one table of task types: what each type means for labels, splits and metrics.

The config check, the workflow's input functions, the split and the
fine-tuning loop all need to know something about a task type, and none of
them may branch on its name: they ask this table. It is free of torch so that
the workflow can read it at parse time; the training behaviour of each type
(outputs, loss, probabilities) is in :mod:`medssl.finetuning.tasktypes`,
registered under the same names and checked against this table by a test.
"""

from __future__ import annotations

from dataclasses import dataclass

from medssl.core.registry import Registry


@dataclass(frozen=True)
class TaskTypeSpec:
    """The facts of one task type that do not need torch.

    ``label_encoding``: how label-table rows become one integer per slice
    (``single``: a class code; ``bits``: one bit per column; ``foreground``:
    1 when the slice's mask shows the structure). ``stratum``: how a patient's
    stratum for the split is formed (``any_positive``, ``majority_class``,
    ``rarest_label``). ``labels_from_masks``: the task's labels are its mask
    file, not a label table. ``dense``: the model predicts a map per pixel (a
    U-Net whose input must be a multiple of 32; no crop-based test-time views).
    ``metrics``: the test metrics of metrics.json, the first being the default
    for model selection and tables; segmentation's ``dice`` is the mean
    per-case (per-patient) Dice, ``dice_global`` the Dice of all test pixels
    pooled (definitions in :mod:`medssl.finetuning.metrics`).
    """

    name: str
    metrics: tuple[str, ...]
    label_encoding: str
    stratum: str
    labels_from_masks: bool = False
    multiple_columns: bool = False
    dense: bool = False


CLASS_METRICS = ("auc", "accuracy", "f1", "balanced_accuracy")
"""Metrics of one label per slice; accuracy, F1 and balanced accuracy of binary tasks are
at the threshold chosen on validation (:mod:`medssl.finetuning.metrics`)."""

TASK_TYPES: Registry[TaskTypeSpec] = Registry("task type")
for _spec in (
    TaskTypeSpec("binary", CLASS_METRICS, "single", "any_positive"),
    TaskTypeSpec("multiclass", CLASS_METRICS, "single", "majority_class"),
    TaskTypeSpec(
        "multilabel", ("auc", "accuracy", "f1"), "bits", "rarest_label", multiple_columns=True
    ),
    TaskTypeSpec(
        "segmentation",
        ("dice", "dice_global", "iou"),
        "foreground",
        "any_positive",
        labels_from_masks=True,
        dense=True,
    ),
):
    TASK_TYPES.add(_spec.name, _spec)


def task_type_spec(name: str) -> TaskTypeSpec:
    """The spec of a task type; an unknown name raises with the known ones."""
    return TASK_TYPES[name]
