"""Task types of fine-tuning: outputs, targets, loss, probabilities and scores, one class each.

The fine-tuning loop is the same for every task; what differs is registered
here (:data:`TASK_TYPES`), so a new task type is one class and one registry
line rather than branches in the loop. The torch-free facts of a type (its
metrics, how labels are encoded, whether they come from masks) are in
:data:`medssl.core.task_types.TASK_TYPES`, under the same names; each class
reads its metrics from there, so the two tables cannot disagree.

* ``binary``: one logit, BCE with logits (``pos_weight`` = n_neg / n_pos when
  balanced); AUC, and accuracy, F1 of the positive class and balanced accuracy
  at the threshold ``finetune.threshold`` chooses on validation.
* ``multiclass``: K logits, cross-entropy (class weights n / (K n_k) when
  balanced); macro one-vs-rest AUC, and accuracy, macro F1 and balanced
  accuracy of the arg-max.
* ``multilabel``: one logit per label column, BCE with logits per label
  (per-label ``pos_weight`` when balanced); mean AUC over labels, element-wise
  accuracy, macro F1, at one validation-chosen threshold per label. The
  partition stores the labels of a slice as a bit mask (bit j = ``columns[j]``),
  decoded here, or, for uncertain labels, per-label values: -1 is left out of
  the loss and the metrics, a soft label is trained on as given and left out
  of the metrics.
* ``segmentation``: a U-Net on the encoder (:mod:`medssl.models.unet`), one logit per
  pixel, soft-Dice (MONAI ``DiceLoss``), BCE, or their sum (:data:`SEG_LOSSES`);
  per-case (per-patient) Dice and IoU and the global Dice, with the
  ``finetune.empty_reference`` rule for cases without foreground.

Each type's :meth:`TaskType.assess` turns one split's probabilities into its
metrics, the flags of a degenerate outcome and the arrays of the test
predictions file (:mod:`medssl.finetuning.metrics` defines all three), so the
loop treats every type alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import ResNet

from medssl.core.registry import Registry
from medssl.core.task_types import TaskTypeSpec, task_type_spec
from medssl.datasets.splits import IGNORED_TARGET
from medssl.finetuning.metrics import (
    SEGMENTATION_THRESHOLD,
    OverlapCounts,
    case_counts,
    choose_threshold,
    classification_flags,
    classification_metrics,
    known_targets,
    metrics_from_counts,
    multilabel_metrics,
    multilabel_predictions,
    overlap_counts,
    predictions,
    segmentation_flags,
    undefined_flags,
)
from medssl.models.backbones import feature_dim


class Classifier(nn.Module):
    """Backbone (pooled features) followed by one linear layer."""

    def __init__(self, backbone: nn.Module, n_outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim(backbone), n_outputs)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (what a frozen backbone computes without gradients)."""
        return self.backbone(images)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """The head on precomputed features."""
        return self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


@dataclass(frozen=True)
class EvalRows:
    """Which samples a split's rows are: HDF5 rows and the patient of each (file order)."""

    sample_index: np.ndarray
    patient_id: np.ndarray

    def __post_init__(self) -> None:
        if len(self.sample_index) != len(self.patient_id):
            raise ValueError(
                f"{len(self.sample_index)} sample indices but {len(self.patient_id)} patient ids"
            )


@dataclass
class Threshold:
    """The decision threshold chosen on validation; ``undefined`` when the rule had no answer
    (validation without one of the classes) and the conventional 0.5 stands in for it."""

    value: float | np.ndarray | None
    rule: str | float
    undefined: bool = False


@dataclass
class Assessment:
    """One split scored: the type's metrics (and detail), degenerate-run flags, file arrays."""

    metrics: dict[str, Any]
    flags: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


FALLBACK_THRESHOLD = 0.5
"""The threshold that stands in when a rule is undefined on the validation split."""


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy()


class TaskType:
    """How one kind of task turns logits into a loss, probabilities and metrics.

    Methods take the resolved ``finetune`` settings
    (:func:`medssl.finetuning.loop.resolve_settings`).
    """

    name = ""
    dense = False
    """True when targets and outputs are per-pixel maps (segmentation)."""

    @property
    def spec(self) -> TaskTypeSpec:
        """The torch-free facts of this type (:mod:`medssl.core.task_types`)."""
        return task_type_spec(self.name)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Test metrics written to metrics.json (and so to runs.csv)."""
        return self.spec.metrics

    def n_outputs(self, task: dict[str, Any], n_codes: int) -> int:
        """Outputs of the network for ``task`` whose partition has label codes 0..n_codes-1."""
        raise NotImplementedError

    def codes_problem(self, task: dict[str, Any], n_codes: int) -> str | None:
        """Why the partition's label codes cannot be this type's labels, or None when they can."""
        return None

    def build_model(self, backbone: ResNet, n_outputs: int, settings: dict[str, Any]) -> nn.Module:
        """The network to fine-tune: ``backbone`` plus what this type puts on it."""
        return Classifier(backbone, n_outputs)

    def targets(self, codes: torch.Tensor, n_outputs: int) -> torch.Tensor:
        """Training targets from the partition's integer label codes."""
        return codes

    def criterion(
        self, settings: dict[str, Any], targets: torch.Tensor | None, n_outputs: int
    ) -> nn.Module:
        """The loss; ``targets`` are the training targets when class weights apply, else None."""
        raise NotImplementedError

    def loss(
        self, criterion: nn.Module, logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """``criterion`` applied to the network's raw outputs."""
        return criterion(logits, targets)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """What the metrics score: per-sample (or per-pixel) probabilities."""
        raise NotImplementedError

    def choose_threshold(
        self, targets: torch.Tensor, probs: torch.Tensor, settings: dict[str, Any]
    ) -> Threshold:
        """The decision threshold of ``finetune.threshold`` on these (validation) predictions."""
        return Threshold(None, "argmax")

    def assess(
        self,
        targets: torch.Tensor,
        probs: torch.Tensor,
        threshold: Threshold,
        rows: EvalRows,
        settings: dict[str, Any],
    ) -> Assessment:
        """Every metric of :attr:`metrics` (plus detail), the flags and the predictions arrays."""
        raise NotImplementedError

    def threshold_record(self, task: dict[str, Any], threshold: Threshold) -> Any:
        """The threshold as metrics.json records it (JSON)."""
        value = threshold.value
        return None if value is None else float(value)

    def classes_missing(self, targets: torch.Tensor, n_outputs: int) -> bool:
        """True when a split lacks a class, so its AUC is undefined."""
        return False

    def extra_metrics(self, task: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
        """Entries this type adds to metrics.json beside ``test`` (none by default)."""
        return {}

    detail_metrics: tuple[str, ...] = ()
    """Metric-like entries of :meth:`extra_metrics` that metrics.json also defines."""


class OneLabel(TaskType):
    """One class per slice (binary, multi-class), scored by :func:`classification_metrics`."""

    def assess(
        self,
        targets: torch.Tensor,
        probs: torch.Tensor,
        threshold: Threshold,
        rows: EvalRows,
        settings: dict[str, Any],
    ) -> Assessment:
        labels, scores = _numpy(targets).astype(np.int64), _numpy(probs).astype(np.float64)
        metrics = classification_metrics(self.name, labels, scores, threshold.value)
        predicted = predictions(self.name, scores, threshold.value)
        flags = classification_flags(scores, predicted) + undefined_flags(metrics, self.metrics)
        arrays = {
            "sample_index": rows.sample_index,
            "patient_id": rows.patient_id,
            "labels": labels,
            "scores": scores,
            "predictions": predicted,
            "threshold": np.float64(np.nan if threshold.value is None else threshold.value),
        }
        return Assessment(metrics, flags, arrays)


class Binary(OneLabel):
    """One logit: the probability that the finding is present."""

    name = "binary"

    def n_outputs(self, task: dict[str, Any], n_codes: int) -> int:
        return 1

    def codes_problem(self, task: dict[str, Any], n_codes: int) -> str | None:
        if n_codes != 2:
            return f"binary task {task.get('name')!r} but partition labels are 0..{n_codes - 1}"
        return None

    def criterion(
        self, settings: dict[str, Any], targets: torch.Tensor | None, n_outputs: int
    ) -> nn.Module:
        weight = None
        if targets is not None:
            positives = int(targets.sum())
            ratio = (len(targets) - positives) / positives if positives else 1.0
            weight = torch.tensor([ratio], dtype=torch.float32, device=targets.device)
        return nn.BCEWithLogitsLoss(pos_weight=weight)

    def loss(
        self, criterion: nn.Module, logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return criterion(logits.squeeze(1), targets.float())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.squeeze(1))

    def choose_threshold(
        self, targets: torch.Tensor, probs: torch.Tensor, settings: dict[str, Any]
    ) -> Threshold:
        rule = settings["threshold"]
        labels, scores = _numpy(targets).astype(np.int64), _numpy(probs).astype(np.float64)
        value = choose_threshold(rule, labels, scores)
        if value is None:
            return Threshold(FALLBACK_THRESHOLD, rule, undefined=True)
        return Threshold(value, rule)

    def classes_missing(self, targets: torch.Tensor, n_outputs: int) -> bool:
        return len(torch.unique(targets)) < 2


class Multiclass(OneLabel):
    """K logits, one class per slice."""

    name = "multiclass"

    def n_outputs(self, task: dict[str, Any], n_codes: int) -> int:
        return n_codes

    def criterion(
        self, settings: dict[str, Any], targets: torch.Tensor | None, n_outputs: int
    ) -> nn.Module:
        weight = None
        if targets is not None:
            counts = torch.bincount(targets, minlength=n_outputs).float()
            present = counts > 0
            weight = torch.zeros(n_outputs, dtype=torch.float32, device=targets.device)
            weight[present] = len(targets) / (int(present.sum()) * counts[present])
        return nn.CrossEntropyLoss(weight=weight)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1)

    def classes_missing(self, targets: torch.Tensor, n_outputs: int) -> bool:
        return len(torch.unique(targets)) < n_outputs


class MaskedBCEWithLogits(nn.Module):
    """BCE with logits over the entries whose target is not -1 (an uncertain label left out).

    Soft targets in (0, 1) (label smoothing of uncertain labels) enter the loss
    as given. The mean is over the entries kept, so a batch with many left-out
    labels does not shrink the gradient; torch's ``BCEWithLogitsLoss`` has no
    ignore value, hence this wrapper around its functional form.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        keep = targets != IGNORED_TARGET
        losses = nn.functional.binary_cross_entropy_with_logits(
            logits, targets.clamp(min=0), pos_weight=self.pos_weight, reduction="none"
        )
        return (losses * keep).sum() / keep.sum().clamp(min=1)


class Multilabel(TaskType):
    """One logit per label column; the partition's code holds one bit per column, or its
    ``targets`` column the per-label values (-1: left out; soft labels in (0, 1))."""

    name = "multilabel"

    def n_outputs(self, task: dict[str, Any], n_codes: int) -> int:
        return len(task["columns"])

    def targets(self, codes: torch.Tensor, n_outputs: int) -> torch.Tensor:
        bits = 2 ** torch.arange(n_outputs, device=codes.device)
        return ((codes.unsqueeze(1) & bits) > 0).float()

    def criterion(
        self, settings: dict[str, Any], targets: torch.Tensor | None, n_outputs: int
    ) -> nn.Module:
        weight = None
        if targets is not None:
            kept = targets != IGNORED_TARGET
            positives = (targets.clamp(min=0) * kept).sum(0)
            ratio = (kept.sum(0) - positives) / positives.clamp(min=1)
            weight = torch.where(positives > 0, ratio, torch.ones_like(ratio))
        return MaskedBCEWithLogits(pos_weight=weight)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def choose_threshold(
        self, targets: torch.Tensor, probs: torch.Tensor, settings: dict[str, Any]
    ) -> Threshold:
        """One threshold per label, each chosen on that label's validation entries that
        are a ground truth (0 or 1)."""
        rule = settings["threshold"]
        labels, scores = _numpy(targets).astype(np.float64), _numpy(probs).astype(np.float64)
        known = known_targets(labels)
        values = [
            choose_threshold(rule, labels[known[:, j], j].astype(np.int64), scores[known[:, j], j])
            for j in range(labels.shape[1])
        ]
        undefined = any(value is None for value in values)
        chosen = np.array([FALLBACK_THRESHOLD if v is None else v for v in values])
        return Threshold(chosen, rule, undefined=undefined)

    def assess(
        self,
        targets: torch.Tensor,
        probs: torch.Tensor,
        threshold: Threshold,
        rows: EvalRows,
        settings: dict[str, Any],
    ) -> Assessment:
        labels, scores = _numpy(targets).astype(np.float64), _numpy(probs).astype(np.float64)
        metrics = multilabel_metrics(labels, scores, threshold.value)
        predicted = multilabel_predictions(scores, threshold.value)
        flags = classification_flags(scores, predicted) + undefined_flags(metrics, self.metrics)
        binary = bool(known_targets(labels).all())
        arrays = {
            "sample_index": rows.sample_index,
            "patient_id": rows.patient_id,
            # 0/1 as integers; with left-out (-1) or soft values the targets as given.
            "labels": labels.astype(np.int64) if binary else labels,
            "scores": scores,
            "predictions": predicted,
            "threshold": np.broadcast_to(
                np.asarray(threshold.value, dtype=np.float64), labels.shape[1:]
            ).copy(),
        }
        return Assessment(metrics, flags, arrays)

    def threshold_record(self, task: dict[str, Any], threshold: Threshold) -> Any:
        columns = task["columns"]
        values = np.broadcast_to(np.asarray(threshold.value, dtype=np.float64), (len(columns),))
        return dict(zip(columns, (float(v) for v in values), strict=True))

    def classes_missing(self, targets: torch.Tensor, n_outputs: int) -> bool:
        known = (targets == 0) | (targets == 1)
        positives = ((targets == 1) & known).sum(0)
        return bool(((positives == 0) | (positives == known.sum(0))).all())

    def extra_metrics(self, task: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
        # The mean AUC hides which finding the model misses; the per-label values keep it.
        per_label = dict(zip(task["columns"], test["auc_per_label"], strict=True))
        return {
            "test_auc_per_label": per_label,
            "test_excluded_entries": int(test.get("excluded_entries", 0)),
        }


class SoftDiceBCE(nn.Module):
    """Soft-Dice (MONAI ``DiceLoss`` on sigmoid outputs) plus BCE with logits, or either alone."""

    def __init__(self, dice: bool, bce: bool) -> None:
        super().__init__()
        from monai.losses import DiceLoss  # lazy: importing MONAI costs seconds

        self.dice = DiceLoss(sigmoid=True, batch=False) if dice else None
        self.bce = nn.BCEWithLogitsLoss() if bce else None

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        if self.dice is not None:
            total = total + self.dice(logits, targets)
        if self.bce is not None:
            total = total + self.bce(logits, targets)
        return total


SEG_LOSSES: Registry[tuple[bool, bool]] = Registry(
    "segmentation loss", {"dice": (True, False), "bce": (False, True), "dice_bce": (True, True)}
)
"""``finetune.seg_loss``: which terms of :class:`SoftDiceBCE` (Dice, BCE) the loss sums."""


class Segmentation(TaskType):
    """A U-Net on the backbone, one logit per pixel; targets are the task's masks."""

    name = "segmentation"
    dense = True

    def n_outputs(self, task: dict[str, Any], n_codes: int) -> int:
        return 1

    def build_model(
        self, backbone: nn.Module, n_outputs: int, settings: dict[str, Any]
    ) -> nn.Module:
        # Imported here: MONAI's networks take about 2 s to import, which every
        # classification fine-tune (most jobs of a grid) would pay for nothing.
        # The decoder follows the encoder's family: a U-Net on the multi-scale
        # maps of a ResNet, ConvNeXt or Swin, UNETR on a plain ViT's tokens.
        from medssl.models import timm_backbones
        from medssl.models.unet import DEFAULT_DECODER_CHANNELS, ResNetUNet, TimmUNet

        family = timm_backbones.family_of(backbone)
        if family in timm_backbones.PLAIN_FAMILIES:
            from medssl.models.unetr import ViTUNETR

            if settings.get("decoder_channels"):
                raise ValueError(
                    "finetune.decoder_channels sets a U-Net decoder (ResNet, ConvNeXt, Swin); "
                    f"a {type(backbone).__name__} segments with UNETR: leave it null"
                )
            return ViTUNETR(backbone, n_outputs)
        channels = settings["decoder_channels"] or DEFAULT_DECODER_CHANNELS
        if family in timm_backbones.HIERARCHICAL_FAMILIES:
            return TimmUNet(backbone, n_outputs, channels)
        return ResNetUNet(backbone, n_outputs, channels)

    def criterion(
        self, settings: dict[str, Any], targets: torch.Tensor | None, n_outputs: int
    ) -> nn.Module:
        # Class weights are for label tables; a mask's pixels are not weighted, so no targets.
        return SoftDiceBCE(*SEG_LOSSES[settings["seg_loss"]])

    detail_metrics = ("dice_slice", "iou_slice")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits[:, 0])

    def choose_threshold(
        self, targets: torch.Tensor, probs: torch.Tensor, settings: dict[str, Any]
    ) -> Threshold:
        # A fixed pixel threshold: Dice scores an overlap, not a ranking to cut.
        return Threshold(SEGMENTATION_THRESHOLD, "fixed")

    def assess(
        self,
        targets: torch.Tensor,
        probs: torch.Tensor,
        threshold: Threshold,
        rows: EvalRows,
        settings: dict[str, Any],
    ) -> Assessment:
        """Cases are patients: :attr:`EvalRows.patient_id` groups the slices."""
        probs = probs.detach().cpu()
        counts = overlap_counts(targets[:, 0].detach().cpu(), probs, float(threshold.value))
        return self.assess_counts(counts, probs, rows, settings)

    def assess_counts(
        self,
        counts: OverlapCounts,
        probs: torch.Tensor,
        rows: EvalRows,
        settings: dict[str, Any],
    ) -> Assessment:
        """:meth:`assess` from a split's per-slice overlap counts, which is all a streamed
        evaluation keeps; ``probs`` need only hold the extreme probabilities (the flags
        look at their spread)."""
        metrics = metrics_from_counts(counts, rows.patient_id, settings["empty_reference"])
        flags = segmentation_flags(probs, counts) + undefined_flags(metrics, self.metrics)
        cases, per_case = case_counts(counts, rows.patient_id)
        arrays = {
            "case_id": cases,
            "intersection": per_case.intersection,
            "pred_sum": per_case.pred_sum,
            "ref_sum": per_case.ref_sum,
            "sample_index": rows.sample_index,
            "patient_id": rows.patient_id,
            "slice_intersection": counts.intersection,
            "slice_pred_sum": counts.pred_sum,
            "slice_ref_sum": counts.ref_sum,
            "pixels_per_slice": np.int64(counts.pixels_per_slice),
        }
        return Assessment(metrics, flags, arrays)

    def extra_metrics(self, task: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
        # Per-slice means and how many cases the mean holds: what "dice" left out is visible.
        keys = (*self.detail_metrics, "n_cases", "n_cases_scored", "n_cases_empty_reference")
        return {"test_detail": {key: test[key] for key in keys}}


TASK_TYPES: Registry[TaskType] = Registry(
    "task type", {t.name: t for t in (Binary(), Multiclass(), Multilabel(), Segmentation())}
)
"""The training behaviour of every task type, under the names of
:data:`medssl.core.task_types.TASK_TYPES` (a test keeps the two equal)."""


def task_type(name: str) -> TaskType:
    """The registered task type ``name``; an unknown name lists the known ones."""
    return TASK_TYPES[name]


def metric_names() -> dict[str, tuple[str, ...]]:
    """Test metrics per task type (what ``select_metric`` may name, besides ``loss``)."""
    return {name: t.metrics for name, t in TASK_TYPES.items()}
