"""Task types of fine-tuning: outputs, targets, loss, probabilities and metrics, one class each.

The fine-tuning loop is the same for every task; what differs is registered
here (:data:`TASK_TYPES`), so a new task type is one class and one registry
line rather than branches in the loop.

* ``binary``: one logit, BCE with logits (``pos_weight`` = n_neg / n_pos when
  balanced); AUC, accuracy, F1 of the positive class.
* ``multiclass``: K logits, cross-entropy (class weights n / (K n_k) when
  balanced); macro one-vs-rest AUC, accuracy, macro F1.
* ``multilabel``: one logit per label column, BCE with logits per label
  (per-label ``pos_weight`` when balanced); mean AUC over labels, element-wise
  accuracy, macro F1. The partition stores the labels of a slice as a bit mask
  (bit j = ``columns[j]``), decoded here.
* ``segmentation``: a U-Net on the encoder (:mod:`medssl.models.unet`), one logit per
  pixel, soft-Dice (MONAI ``DiceLoss``), BCE, or their sum; per-slice Dice and IoU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import ResNet

from medssl.finetuning.metrics import classification_metrics, multilabel_metrics, segmentation_metrics
from medssl.models.backbones import feature_dim
from medssl.models.unet import DEFAULT_DECODER_CHANNELS, ResNetUNet


class Classifier(nn.Module):
    """Backbone (pooled features) followed by one linear layer."""

    def __init__(self, backbone: nn.Module, n_outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim(backbone), n_outputs)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class TaskType:
    """How one kind of task turns logits into a loss, probabilities and metrics."""

    name = ""
    metrics: tuple[str, ...] = ()
    """Test metrics written to metrics.json (and so to runs.csv)."""
    dense = False
    """True when targets and outputs are per-pixel maps (segmentation)."""

    def n_outputs(self, task: dict[str, Any], n_codes: int) -> int:
        raise NotImplementedError

    def build_model(self, backbone: ResNet, n_outputs: int, settings: dict[str, Any]) -> nn.Module:
        return Classifier(backbone, n_outputs)

    def targets(self, codes: torch.Tensor, n_outputs: int) -> torch.Tensor:
        """Training targets from the partition's integer label codes."""
        return codes

    def criterion(
        self, settings: dict[str, Any], targets: torch.Tensor | None, n_outputs: int
    ) -> nn.Module:
        """The loss; ``targets`` are the training targets when class weights apply, else None."""
        raise NotImplementedError

    def loss(self, criterion: nn.Module, logits: torch.Tensor, targets: torch.Tensor):
        return criterion(logits, targets)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, targets: torch.Tensor, probs: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def classes_missing(self, targets: torch.Tensor, n_outputs: int) -> bool:
        """True when a split lacks a class, so its AUC is undefined."""
        return False


class Binary(TaskType):
    name = "binary"
    metrics = ("auc", "accuracy", "f1")

    def n_outputs(self, task, n_codes):
        return 1

    def criterion(self, settings, targets, n_outputs):
        weight = None
        if targets is not None:
            positives = int(targets.sum())
            ratio = (len(targets) - positives) / positives if positives else 1.0
            weight = torch.tensor([ratio], dtype=torch.float32, device=targets.device)
        return nn.BCEWithLogitsLoss(pos_weight=weight)

    def loss(self, criterion, logits, targets):
        return criterion(logits.squeeze(1), targets.float())

    def probabilities(self, logits):
        return torch.sigmoid(logits.squeeze(1))

    def score(self, targets, probs):
        return classification_metrics("binary", targets.cpu().numpy(), probs.cpu().numpy())

    def classes_missing(self, targets, n_outputs):
        return len(torch.unique(targets)) < 2


class Multiclass(TaskType):
    name = "multiclass"
    metrics = ("auc", "accuracy", "f1")

    def n_outputs(self, task, n_codes):
        return n_codes

    def criterion(self, settings, targets, n_outputs):
        weight = None
        if targets is not None:
            counts = torch.bincount(targets, minlength=n_outputs).float()
            present = counts > 0
            weight = torch.zeros(n_outputs, dtype=torch.float32, device=targets.device)
            weight[present] = len(targets) / (int(present.sum()) * counts[present])
        return nn.CrossEntropyLoss(weight=weight)

    def probabilities(self, logits):
        return torch.softmax(logits, dim=1)

    def score(self, targets, probs):
        return classification_metrics("multiclass", targets.cpu().numpy(), probs.cpu().numpy())

    def classes_missing(self, targets, n_outputs):
        return len(torch.unique(targets)) < n_outputs


class Multilabel(TaskType):
    name = "multilabel"
    metrics = ("auc", "accuracy", "f1")

    def n_outputs(self, task, n_codes):
        return len(task["columns"])

    def targets(self, codes, n_outputs):
        bits = 2 ** torch.arange(n_outputs, device=codes.device)
        return ((codes.unsqueeze(1) & bits) > 0).float()

    def criterion(self, settings, targets, n_outputs):
        weight = None
        if targets is not None:
            positives = targets.sum(0)
            ratio = (len(targets) - positives) / positives.clamp(min=1)
            weight = torch.where(positives > 0, ratio, torch.ones_like(ratio))
        return nn.BCEWithLogitsLoss(pos_weight=weight)

    def probabilities(self, logits):
        return torch.sigmoid(logits)

    def score(self, targets, probs):
        return multilabel_metrics(targets.cpu().numpy(), probs.cpu().numpy())

    def classes_missing(self, targets, n_outputs):
        counts = targets.sum(0)
        return bool(((counts == 0) | (counts == len(targets))).all())


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


class Segmentation(TaskType):
    name = "segmentation"
    metrics = ("dice", "iou")
    dense = True
    LOSSES = {"dice": (True, False), "bce": (False, True), "dice_bce": (True, True)}

    def n_outputs(self, task, n_codes):
        return 1

    def build_model(self, backbone, n_outputs, settings):
        channels = settings.get("decoder_channels") or DEFAULT_DECODER_CHANNELS
        return ResNetUNet(backbone, n_outputs, channels)

    def criterion(self, settings, targets, n_outputs):
        loss = settings.get("seg_loss", "dice")
        if loss not in self.LOSSES:
            raise ValueError(f"seg_loss {loss!r} is not one of {sorted(self.LOSSES)}")
        return SoftDiceBCE(*self.LOSSES[loss])

    def probabilities(self, logits):
        return torch.sigmoid(logits[:, 0])

    def score(self, targets, probs):
        return segmentation_metrics(targets[:, 0].cpu(), probs.cpu())


TASK_TYPES: dict[str, TaskType] = {
    t.name: t for t in (Binary(), Multiclass(), Multilabel(), Segmentation())
}


def task_type(name: str) -> TaskType:
    """The registered task type ``name``; the error lists the known ones."""
    if name not in TASK_TYPES:
        raise ValueError(f"task type {name!r} is not one of {sorted(TASK_TYPES)}")
    return TASK_TYPES[name]


def metric_names() -> dict[str, tuple[str, ...]]:
    """Test metrics per task type (what ``select_metric`` may name, besides ``loss``)."""
    return {name: t.metrics for name, t in TASK_TYPES.items()}
