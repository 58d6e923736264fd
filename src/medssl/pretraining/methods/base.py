"""The self-supervised method interface and the registry of method classes.

A method owns a backbone (a torchvision ResNet whose ``fc`` is ``Identity``,
or a timm ConvNeXt, ViT or Swin without classifier, from
:func:`medssl.models.backbones.build_backbone`; each returns pooled features)
plus whatever heads it trains, and turns a list of augmented views into a
scalar loss. The one training loop in :mod:`medssl.pretraining.loop` drives
every method through this interface, so methods differ only in what the paper differs in.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torchvision.models.resnet import ResNet

from medssl.core.registry import Registry, look_up
from medssl.models.backbones import feature_dim
from medssl.pretraining.augment import MultiCrop, MultiView
from medssl.pretraining.methods import METHODS

if TYPE_CHECKING:
    from medssl.pretraining.loop import StepPlan

METHOD_CLASSES: Registry[type[Method]] = Registry("method class")
"""Method classes by name, filled by :func:`register` as their modules are imported
(by :func:`medssl.pretraining.methods.method_class`, which imports them by name)."""


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator adding a method class under ``name``, a name :data:`METHODS` lists.

    A class registered under a name the table lacks could never be built, so
    that is refused at import time.
    """
    look_up("method", name, METHODS)

    def decorate(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHOD_CLASSES.add(name, cls)

    return decorate


class Method(nn.Module, metaclass=abc.ABCMeta):
    """Base class of self-supervised methods.

    Subclasses set ``default_settings`` and implement :meth:`forward`; EMA
    methods (BYOL, DINO...) also override :meth:`on_step_end`.
    """

    name: ClassVar[str] = ""
    views_per_sample: ClassVar[int] = 2
    default_settings: ClassVar[dict[str, Any]] = {}
    optim_recipe: ClassVar[dict[str, Any]] = {}
    """The original's optimiser, learning rate (per 256 images when ``lr_scaling``
    is linear), weight decay and schedule: trainer keys that apply unless the
    ``pretrain`` section or ``pretrain.<method>.optim`` sets them."""
    sync_batch_norm: ClassVar[bool] = True
    """Normalise over the global batch of all DDP ranks, as the originals do
    (MoCo, which uses shuffle BN instead, turns it off)."""
    ddp_find_unused_parameters: ClassVar[bool] = False
    """Whether some trainable parameters may get no gradient in a step (SwAV's
    frozen prototypes); DDP must then look for them, which costs a graph walk."""
    no_decay_lr_scale: ClassVar[float] = 1.0
    """Learning rate of biases and normalisation parameters relative to the weights'."""
    exclude_bias_and_norm: ClassVar[bool] = True
    """Whether biases and normalisation parameters escape weight decay and LARS/LAMB's
    trust ratio (SimCLR, BYOL, Barlow Twins, SparK); MoCo's SGD and SwAV's LARC
    treat every parameter alike."""

    def __init__(self, backbone: ResNet, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.settings = self.resolve_settings(settings)

    @classmethod
    def resolve_settings(cls, settings: Mapping[str, Any] | None) -> dict[str, Any]:
        """``default_settings`` overridden by ``settings``; unknown keys are an error.

        A misspelt key silently ignored would leave a default in force while the
        config claims otherwise.
        """
        settings = dict(settings or {})
        for key in sorted(set(settings) - set(cls.default_settings)):
            look_up(f"{cls.name} setting", key, cls.default_settings)
        return {**cls.default_settings, **settings}

    @classmethod
    def fit_to_run(cls, settings: Mapping[str, Any], plan: StepPlan) -> dict[str, Any]:
        """``settings`` (all keys, as :meth:`resolve_settings` gives them) fitted to one run.

        Some of the originals' defaults are tuned for one schedule (SwAV's
        queue for batch 256 over hundreds of epochs, BYOL's momentum for 1,000
        epochs, MoCo's 65,536 keys for ImageNet) and leave a part untrained in
        a short small-batch run. Such settings default to null in
        ``default_settings`` and are resolved here, once the run's length is
        known (:class:`medssl.pretraining.loop.StepPlan`); a value the config
        sets is kept. The base method has none and returns ``settings``.
        """
        del plan
        return dict(settings)

    @classmethod
    def schedule_warnings(cls, settings: Mapping[str, Any], plan: StepPlan) -> list[str]:
        """Why a part of the method would stay untrained in this run, one message per part.

        ``settings`` are those :meth:`fit_to_run` returned. The base method
        has no such part; the trainer's own (warm-up) is checked by
        :func:`medssl.pretraining.recipes.check_schedule`.
        """
        del settings, plan
        return []

    @property
    def feature_dim(self) -> int:
        """Width of the backbone's pooled features."""
        return feature_dim(self.backbone)

    @abc.abstractmethod
    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Scalar loss for a batch given as ``views_per_sample`` tensors (N, C, H, W)."""

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Parameter groups: weights, and biases/normalisation parameters.

        Biases and BatchNorm scales/shifts (every parameter with at most one
        dimension) get no weight decay and are excluded from LARS's layer-wise
        adaptation, as in SimCLR and BYOL: decaying a BN scale towards zero
        only fights the normalisation. ``lars_exclude`` marks the group. Methods
        whose originals treat every parameter alike set ``exclude_bias_and_norm``
        to False and get one group. A timm backbone's ``no_weight_decay()``
        names (a ViT's class and register tokens and position embedding, Swin's
        relative position tables) join the second group, as timm's own
        optimiser factory puts them.
        """
        exempt = self._timm_no_decay_names()
        decay, no_decay = [], []
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            excluded = self.exclude_bias_and_norm and (parameter.ndim <= 1 or name in exempt)
            (no_decay if excluded else decay).append(parameter)
        groups: list[dict[str, Any]] = [{"params": decay, "lars_exclude": False}]
        if no_decay:
            groups.append(
                {
                    "params": no_decay,
                    "weight_decay": 0.0,
                    "lars_exclude": True,
                    "lr_scale": self.no_decay_lr_scale,
                }
            )
        return groups

    def _timm_no_decay_names(self) -> set[str]:
        """Parameter names (in this module) that the backbone's ``no_weight_decay()`` lists."""
        listed = getattr(self.backbone, "no_weight_decay", None)
        if listed is None:
            return set()
        prefix = next(n for n, m in self.named_modules() if m is self.backbone)
        return {f"{prefix}.{name}" for name in listed()}

    def make_views(self, augment: Mapping[str, Any] | None, seed: int) -> MultiView | MultiCrop:
        """The transform turning an image into this method's list of views.

        ``views_per_sample`` identical-size views by default; a method with
        views of several resolutions (SwAV's multi-crop) overrides this.
        """
        return MultiView(augment, n_views=self.views_per_sample, seed=seed)

    def on_epoch_start(self, epoch: int) -> None:
        """Called before every epoch (0-based ``epoch``); the base method does nothing.

        Exists for state that switches on at an epoch, such as SwAV's queue.
        """
        del epoch

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step (1-based ``step``); the base method does nothing.

        Exists so that momentum-encoder methods can update their target
        network with a schedule that depends on training progress.
        """
        del step, total_steps

    def augment_overrides(self) -> dict[str, Any]:
        """Augmentation keys the method's paper fixes, applied over the shared ``pretrain.augment``.

        The base method fixes none. Masked image modelling (SparK) trains on
        crops and flips only, whereas the contrastive methods need the full
        set of views; one shared ``augment`` section cannot serve both.
        """
        return {}

    def encoder(self) -> ResNet:
        """The network exported for fine-tuning: the backbone, without any head."""
        return self.backbone
