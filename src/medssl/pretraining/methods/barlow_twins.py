"""Barlow Twins (Zbontar et al., 2021): make the views' cross-correlation the identity."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medssl.pretraining import distributed
from medssl.pretraining.methods.base import Method, register
from medssl.pretraining.methods.heads import mlp
from medssl.pretraining.methods.loss_helpers import check_pair, wide


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, off_diagonal_weight: float, eps: float = 1e-5
) -> torch.Tensor:
    """Barlow Twins' redundancy-reduction loss (Zbontar et al., 2021, eq. 1-2).

    Each embedding dimension is standardised over the batch (mean 0, biased
    variance 1 plus ``eps``, as an affine-free BatchNorm in training mode),
    then the cross-correlation ``C = z1n.T @ z2n / N`` (D x D) is pushed to
    the identity::

        L = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2

    ``off_diagonal_weight`` is lambda (0.0051 in the paper).
    """
    check_pair("barlow_twins", z1, z2)
    if z1.shape[0] < 2:
        raise ValueError("barlow_twins needs a batch of at least 2 to standardise over")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a, b = (F.batch_norm(wide(z), None, None, training=True, eps=eps) for z in (z1, z2))
        correlation = a.T @ b / z1.shape[0]
        diagonal = torch.diagonal(correlation)
        on_diagonal = (diagonal - 1).pow(2).sum()
        off_diagonal = correlation.pow(2).sum() - diagonal.pow(2).sum()
        return on_diagonal + off_diagonal_weight * off_diagonal


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
        return barlow_twins_loss(z1, z2, float(self.settings["lambda"]))
