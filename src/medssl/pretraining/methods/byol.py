"""BYOL (Grill et al., 2020): predict a slowly moving target network's projection."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medssl.pretraining.methods.base import Method, register
from medssl.pretraining.methods.heads import ema_update, frozen_copy, mlp
from medssl.pretraining.methods.loss_helpers import check_pair, wide


def target_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's EMA rate ``1 - (1 - base) * (cos(pi k / K) + 1) / 2`` at 0-based step ``k``.

    Rises from ``base`` (0.996 in the paper) at the first update to 1 at the
    end of training, so the target freezes as the online network converges.
    """
    if total_steps < 1 or not 0 <= step <= total_steps:
        raise ValueError(f"step {step} outside 0..total_steps ({total_steps})")
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


def byol_regression(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's loss for one direction (Grill et al., 2020, eq. 2): ``2 - 2 cos(p, z')``.

    The squared distance of the L2-normalised prediction and target
    projection, averaged over the batch; the target gets no gradient. BYOL
    symmetrises by adding the loss with the views swapped.
    """
    check_pair("byol_regression", prediction, target)
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        cosine = F.cosine_similarity(wide(prediction), wide(target.detach()), dim=1)
        return (2 - 2 * cosine).mean()


@register("byol")
class BYOL(Method):
    """Online backbone + projector + predictor; target backbone + projector as EMA.

    Projector and predictor are Linear - BN - ReLU - Linear with a 4096-wide
    hidden layer and 256 outputs (the paper's). The loss is the symmetrised
    ``2 - 2 cos`` regression, summed over both directions as in the official
    code; the target's parameters are updated after every optimiser step
    with :func:`target_momentum`. The exported encoder is the online backbone.
    """

    default_settings: ClassVar[dict[str, Any]] = {
        "hidden_dim": 4096,
        "proj_dim": 256,
        "base_momentum": 0.996,
    }
    # deepmind-research/byol: LARS, lr 0.2 x batch/256, weight decay 1.5e-6,
    # 10 warm-up epochs, cosine to 0; biases and BN excluded from both.
    # (lucidrains/byol-pytorch's Adam 3e-4 is ``optim: {optimizer: adam, lr: 3e-4}``.)
    optim_recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "lars",
        "lr": 0.2,
        "lr_scaling": "linear",
        "weight_decay": 1.5e-6,
        "momentum": 0.9,
        "warmup_epochs": 10,
        "final_lr_fraction": 0.0,
    }

    def __init__(self, backbone: nn.Module, settings: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, settings)
        hidden, out = int(self.settings["hidden_dim"]), int(self.settings["proj_dim"])
        if not 0.0 <= float(self.settings["base_momentum"]) <= 1.0:
            raise ValueError(
                f"byol.base_momentum must be in [0, 1], got {self.settings['base_momentum']}"
            )
        self.projector = mlp([self.feature_dim, hidden, out], batch_norm=True)
        self.predictor = mlp([out, hidden, out], batch_norm=True)
        self.target = frozen_copy(nn.Sequential(self.backbone, self.projector))

    def online(self) -> nn.Sequential:
        """Backbone and projector in the order their parameters pair with the target's."""
        return nn.Sequential(self.backbone, self.projector)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """``L(p1, z2') + L(p2, z1')`` over one batched pass per network."""
        if len(views) != 2:
            raise ValueError(f"BYOL needs 2 views per sample, got {len(views)}")
        n = views[0].shape[0]
        both = torch.cat(views)
        predictions = self.predictor(self.projector(self.backbone(both)))
        with torch.no_grad():
            targets = self.target(both)
        return byol_regression(predictions[:n], targets[n:]) + byol_regression(
            predictions[n:], targets[:n]
        )

    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA of the online network into the target, at the schedule's rate for this step."""
        momentum = target_momentum(float(self.settings["base_momentum"]), step - 1, total_steps)
        ema_update(self.target, self.online(), momentum)
