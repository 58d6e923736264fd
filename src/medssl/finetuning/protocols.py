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
* ``knn``: nothing trains. The frozen encoder's features of the training
  subset become a bank, and each validation or test image is answered by the
  weighted vote of its ``knn_k`` nearest neighbours at ``knn_temperature``
  (DINO's protocol, :mod:`medssl.finetuning.knn`): zero epochs, and
  :meth:`Protocol.model_from_batches` gives the model that answers.

A protocol's own settings and their defaults are :attr:`Protocol.setting_defaults`
(all of them: :data:`PROTOCOL_SETTING_DEFAULTS`), checked by
:meth:`Protocol.check_settings`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from medssl.core.registry import Registry

if TYPE_CHECKING:  # torch stays out of this module's import: the protocols are plain rules
    import torch
    from torch import nn


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch does: backbone trained or frozen, lr factor per parameter group."""

    train_backbone: bool
    lr_factor: dict[str, float]


class Protocol:
    """Base class: subclasses say, per 1-based epoch, what trains and how fast."""

    name = ""
    setting_defaults: ClassVar[dict[str, Any]] = {}
    """This protocol's own ``finetune`` settings and their defaults."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = {**self.setting_defaults, **settings}
        self.check_settings()

    def check_settings(self) -> None:
        """Raise ``ValueError`` naming the setting when one of this protocol's is out of range."""

    def planned_epochs(self) -> int:
        """Training epochs the run plans (``finetune.epochs``; early stopping may end it sooner)."""
        return int(self.settings["epochs"])

    def model_from_batches(
        self,
        model: nn.Module,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        task_type: str,
        n_outputs: int,
    ) -> nn.Module | None:
        """For a protocol that trains nothing, the model that answers instead; else None.

        ``model`` is the network built for the task (``model.backbone`` the
        encoder), ``batches`` the training subset as ``(images, task-type
        targets)`` batches, drawn only by a protocol that uses them.
        """
        return None

    def model_without_training(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        task_type: str,
        n_outputs: int,
    ) -> nn.Module | None:
        """:meth:`model_from_batches` of a training subset held as two tensors."""
        import torch  # lazy: this module stays torch-free at import

        batches = zip(torch.split(images, 256), torch.split(targets, 256), strict=True)
        return self.model_from_batches(model, batches, task_type, n_outputs)

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


class KNN(Protocol):
    """A weighted k-nearest-neighbour probe on the frozen encoder's features; nothing trains.

    ``knn_k`` neighbours vote with weights ``exp(cosine / knn_temperature)``
    (DINO's 20 and 0.07 by default). Only one-label-per-image task types
    can be answered; segmentation is refused when the model is made.
    """

    name = "knn"
    # Literal values, equal to medssl.finetuning.knn's DEFAULT_K and DEFAULT_TEMPERATURE
    # (a test keeps them so): importing that module here would import torch.
    setting_defaults: ClassVar[dict[str, Any]] = {"knn_k": 20, "knn_temperature": 0.07}

    def check_settings(self) -> None:
        k, temperature = self.settings["knn_k"], self.settings["knn_temperature"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"finetune.knn_k must be an integer >= 1, got {k!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"finetune.knn_temperature must be a number, got {temperature!r}")
        if not temperature > 0:
            raise ValueError(f"finetune.knn_temperature must be > 0, got {temperature!r}")

    def planned_epochs(self) -> int:
        return 0

    def plan(self, epoch: int) -> EpochPlan:
        raise ValueError("protocol knn trains nothing: it has no epoch to plan")

    def trains_backbone_ever(self) -> bool:
        return False

    def model_from_batches(
        self,
        model: nn.Module,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        task_type: str,
        n_outputs: int,
    ) -> nn.Module:
        """The kNN probe of ``model.backbone`` with the training subset as its bank."""
        from medssl.finetuning.knn import probe_from_batches  # lazy: keeps torch out

        return probe_from_batches(
            model.backbone,
            batches,
            task_type,
            n_outputs,
            k=int(self.settings["knn_k"]),
            temperature=float(self.settings["knn_temperature"]),
        )


PROTOCOLS: Registry[type[Protocol]] = Registry(
    "fine-tuning protocol", {cls.name: cls for cls in (Full, Linear, FrozenThenUnfrozen, KNN)}
)
"""The protocols by name (``finetune.protocol`` in the config)."""

PROTOCOL_SETTING_DEFAULTS: dict[str, Any] = {
    key: value for cls in PROTOCOLS.values() for key, value in cls.setting_defaults.items()
}
"""Every protocol's own settings and defaults, for the ``finetune`` section's defaults."""


def make_protocol(settings: dict[str, Any]) -> Protocol:
    """The protocol named by ``settings["protocol"]``; an unknown name lists the known ones."""
    return PROTOCOLS[settings["protocol"]](settings)
