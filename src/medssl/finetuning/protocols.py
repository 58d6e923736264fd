"""Fine-tuning protocols: which parameters train in which epoch, and at what learning rate.

A protocol answers two questions per epoch: is the backbone trained, and by
what factor is the base learning rate multiplied (per parameter group:
``backbone`` and ``head``). The training loop asks and never branches on the
protocol's name, so a new protocol is one class and one registry line.

* ``full``: everything trains at the base lr from the first epoch.
* ``linear``: the backbone stays frozen (weights and BatchNorm statistics);
  only the head trains. With a U-Net the head is the decoder.
* ``frozen_then_unfrozen`` (Wolf et al. 2023): the backbone is frozen for the
  first ``freeze_epochs`` epochs while the head trains at the base lr; from
  then on everything trains, starting at ``unfreeze_lr_factor`` x lr and
  growing by ``unfreeze_lr_growth`` per epoch until it is back at the base lr
  (0.1 x, 0.2 x, 0.4 x, 0.8 x, 1 x with the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medssl.core.registry import Registry


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch does: backbone trained or frozen, lr factor per parameter group."""

    train_backbone: bool
    lr_factor: dict[str, float]


class Protocol:
    """Base class: subclasses say, per 1-based epoch, what trains and how fast."""

    name = ""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def plan(self, epoch: int) -> EpochPlan:
        """What epoch ``epoch`` (1-based) trains, and at what lr factor per group."""
        raise NotImplementedError

    def trains_backbone_ever(self) -> bool:
        """False when the backbone never trains (it can then stay out of the optimiser)."""
        return True

    def earliest_stop(self) -> int:
        """First epoch after which early stopping may end the run."""
        return 1


class Full(Protocol):
    """Everything trains at the base lr from the first epoch."""

    name = "full"

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(True, {"backbone": 1.0, "head": 1.0})


class Linear(Protocol):
    """A linear probe: only the head (or the U-Net decoder) ever trains."""

    name = "linear"

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(False, {"backbone": 0.0, "head": 1.0})

    def trains_backbone_ever(self) -> bool:
        return False


class FrozenThenUnfrozen(Protocol):
    """Head first with the backbone frozen, then everything with a growing lr (Wolf et al.)."""

    name = "frozen_then_unfrozen"

    def plan(self, epoch: int) -> EpochPlan:
        frozen = int(self.settings["freeze_epochs"])
        if epoch <= frozen:
            return EpochPlan(False, {"backbone": 0.0, "head": 1.0})
        start = float(self.settings["unfreeze_lr_factor"])
        growth = float(self.settings["unfreeze_lr_growth"])
        factor = min(1.0, start * growth ** (epoch - frozen - 1))
        return EpochPlan(True, {"backbone": factor, "head": factor})

    def earliest_stop(self) -> int:
        # Stopping while the backbone is still frozen would turn the protocol into a linear probe.
        return int(self.settings["freeze_epochs"]) + 1


PROTOCOLS: Registry[type[Protocol]] = Registry(
    "fine-tuning protocol", {cls.name: cls for cls in (Full, Linear, FrozenThenUnfrozen)}
)
"""The protocols by name (``finetune.protocol`` in the config)."""


def make_protocol(settings: dict[str, Any]) -> Protocol:
    """The protocol named by ``settings["protocol"]``; an unknown name lists the known ones."""
    return PROTOCOLS[settings["protocol"]](settings)
