"""Barlow Twins (Zbontar et al., 2021): make the views' cross-correlation the identity."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from medssl.pretraining import distributed
from medssl.pretraining.methods.base import Method, register
from medssl.pretraining.methods.heads import mlp
from medssl.pretraining.methods.losses import barlow_twins


@register("barlow_twins")
class BarlowTwins(Method):
    """Backbone, 3-layer projector and the redundancy-reduction loss.

    The projector is three Linear layers (BN and ReLU after the first two,
    no biases), 8192 wide in the paper; ``proj_dims`` overrides the widths
    for small models. ``lambda`` 0.0051 weighs the off-diagonal term. The
    loss standardises each embedding dimension over the batch itself (an
    affine-free BatchNorm), so the projector ends without one.
    """

    default_settings: ClassVar[dict[str, Any]] = {
        "proj_dims": [8192, 8192, 8192],
        "lambda": 0.0051,
    }
    # facebookresearch/barlowtwins: LARS, lr 0.2 x batch/256 for weights and
    # 0.0048 x batch/256 for biases and BN (no decay, no adaptation), weight
    # decay 1.5e-6, 10 warm-up epochs, cosine down to 0.001 of the peak.
    optim_recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "lars",
        "lr": 0.2,
        "lr_scaling": "linear",
        "weight_decay": 1.5e-6,
        "momentum": 0.9,
        "warmup_epochs": 10,
        "final_lr_fraction": 0.001,
    }
    no_decay_lr_scale: ClassVar[float] = 0.0048 / 0.2

    def __init__(self, backbone: nn.Module, settings: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, settings)
        dims = [int(d) for d in self.settings["proj_dims"]]
        if len(dims) != 3:
            raise ValueError(f"barlow_twins.proj_dims must list 3 widths, got {dims}")
        self.projector = mlp([self.feature_dim, *dims], batch_norm=True, last_bias=False)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The loss between the projections of two views, from one backbone pass per view.

        The views go through the network separately, as in the official code:
        each BatchNorm then standardises one view's batch, and the loss's own
        per-view standardisation matches it.
        """
        if len(views) != 2:
            raise ValueError(f"Barlow Twins needs 2 views per sample, got {len(views)}")
        z1, z2 = (distributed.gather(self.projector(self.backbone(view))) for view in views)
        # Under DDP the standardisation and the cross-correlation cover the
        # global batch, as the official code's synchronised BN and all_reduce do.
        return barlow_twins(z1, z2, float(self.settings["lambda"]))
