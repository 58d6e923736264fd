"""Projection and prediction heads, and the momentum (EMA) update of target networks.

The originals differ only in widths, in whether hidden layers have
BatchNorm and in whether the last layer has a bias, so one builder covers
MoCo v2's, BYOL's, SwAV's and Barlow Twins' heads.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn


def mlp(dims: Sequence[int], *, batch_norm: bool, last_bias: bool = True) -> nn.Sequential:
    """Linear layers ``dims[0] -> ... -> dims[-1]`` with (BN and) ReLU between them.

    Hidden linear layers feeding a BatchNorm have no bias (the BN shift makes
    it redundant); the last layer has none when ``last_bias`` is False.
    """
    if len(dims) < 2 or any(int(d) < 1 for d in dims):
        raise ValueError(f"an MLP needs at least two positive widths, got {list(dims)}")
    layers: list[nn.Module] = []
    for width_in, width_out in zip(dims[:-2], dims[1:-1], strict=True):
        layers.append(nn.Linear(int(width_in), int(width_out), bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(int(width_out)))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(int(dims[-2]), int(dims[-1]), bias=last_bias))
    return nn.Sequential(*layers)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters take no gradient (a momentum target)."""
    target = copy.deepcopy(module)
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online``, parameter by parameter.

    Buffers (BatchNorm running statistics) are not averaged: as in MoCo and
    BYOL the target network keeps its own, and in training mode it normalises
    with batch statistics anyway.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError("target and online networks have different parameter lists")
    for target_param, online_param in zip(target_params, online_params, strict=True):
        target_param.mul_(momentum).add_(online_param, alpha=1.0 - momentum)
