"""BYOL (Grill et al., 2020): predict a slowly moving target network's projection."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medssl.pretraining.methods.base import Method, register
from medssl.pretraining.methods.heads import ema_update, frozen_copy, mlp
from medssl.pretraining.methods.loss_helpers import check_pair, wide

if TYPE_CHECKING:
    from medssl.pretraining.loop import StepPlan

log = logging.getLogger(__name__)

MOMENTUM_PRESETS: tuple[tuple[int, float], ...] = ((40, 0.97), (300, 0.99))
"""(up to this many epochs, base momentum): google-deepmind/deepmind-research,
byol/configs/byol.py, ``_EMA_PRESETS`` = {40: 0.97, 100: 0.99, 300: 0.99, 1000: 0.996}
(``base_target_ema``); a run between two presets takes the next longer one's."""

LONG_RUN_MOMENTUM = 0.996
"""The 1,000-epoch preset, the paper's value; also used when built without a run."""

TARGET_STILL_INITIAL_LIMIT = 0.5
"""A target network that keeps more than this share of its initial weights at the end
of the run has hardly moved: its projections are close to a random network's."""


def preset_momentum(epochs: int) -> float:
    """The official base momentum of a run of ``epochs`` (:data:`MOMENTUM_PRESETS`)."""
    for longest, momentum in MOMENTUM_PRESETS:
        if epochs <= longest:
            return momentum
    return LONG_RUN_MOMENTUM


def initial_weight_share(base: float, total_steps: int) -> float:
    """Share of the target's initial weights left after ``total_steps`` EMA updates.

    Each update keeps ``m_k`` of the target (:func:`target_momentum`), so the
    initial weights enter the final target with weight ``prod_k m_k``.
    """
    return math.prod(target_momentum(base, k, total_steps) for k in range(total_steps))


def target_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's EMA rate ``1 - (1 - base) * (cos(pi k / K) + 1) / 2`` at 0-based step ``k``.

    Rises from ``base`` (0.996 in the paper's 1,000-epoch run) at the first update to 1 at the
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
    ``base_momentum`` null takes the official preset for the run's length
    (:func:`preset_momentum`: 0.97 up to 40 epochs, 0.99 up to 300, else 0.996).
    """

    default_settings: ClassVar[dict[str, Any]] = {
        "hidden_dim": 4096,
        "proj_dim": 256,
        # null: the official preset for the run's epochs (preset_momentum).
        "base_momentum": None,
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
        if self.settings["base_momentum"] is None:
            self.settings["base_momentum"] = LONG_RUN_MOMENTUM
        if not 0.0 <= float(self.settings["base_momentum"]) <= 1.0:
            raise ValueError(
                f"byol.base_momentum must be in [0, 1], got {self.settings['base_momentum']}"
            )
        self.projector = mlp([self.feature_dim, hidden, out], batch_norm=True)
        self.predictor = mlp([out, hidden, out], batch_norm=True)
        self.target = frozen_copy(nn.Sequential(self.backbone, self.projector))

    @classmethod
    def fit_to_run(cls, settings: Mapping[str, Any], plan: StepPlan) -> dict[str, Any]:
        """A null ``base_momentum`` becomes the official preset for ``plan.epochs``."""
        fitted = dict(settings)
        if fitted["base_momentum"] is None:
            fitted["base_momentum"] = preset_momentum(plan.epochs)
            log.info(
                "byol: base_momentum %s, the official preset for %d epochs",
                fitted["base_momentum"],
                plan.epochs,
            )
        return fitted

    @classmethod
    def schedule_warnings(cls, settings: Mapping[str, Any], plan: StepPlan) -> list[str]:
        """A target that keeps most of its initial (random) weights to the end of the run."""
        base = float(settings["base_momentum"])
        share = initial_weight_share(base, plan.total_steps)
        if share <= TARGET_STILL_INITIAL_LIMIT:
            return []
        return [
            f"byol.base_momentum {base} over {plan.total_steps} steps leaves "
            f"{100 * share:.0f} % of the target network's initial weights at the end: "
            f"the target hardly moves; lower byol.base_momentum or train longer"
        ]

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
