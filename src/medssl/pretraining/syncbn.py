"""BatchNorm whose training statistics cover the global batch of all DDP ranks.

SimCLR, BYOL, SwAV, Barlow Twins and SparK normalise over the whole batch
across devices in their official code (MoCo uses shuffle BN instead). torch's
``nn.SyncBatchNorm`` refuses CPU tensors, which rules out the gloo test of
the multi-process path, and it cannot serve SparK's sparse BatchNorm, whose
statistics must come from the visible positions of every rank. So the
reduction is written here once, for dense and sparse layers alike:
per-rank counts, means and centred sums of squares are gathered with
gradient and merged with Chan et al.'s parallel formula (more accurate in
float32 than merging raw sums of squares).

Layers are patched in place (an instance-level ``forward``, like
:mod:`medssl.pretraining.methods.sparse`), so parameter and buffer names stay
torchvision's. Outside a process group, or in eval mode, they behave exactly
as ``nn.BatchNorm``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medssl.pretraining import distributed

SYNC_ATTRIBUTE = "medssl_sync_stats"
"""Set on a BatchNorm layer whose training statistics span all ranks."""


def batch_norm(module: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``module``'s BatchNorm of ``x`` (N, C, ...), with global statistics when synchronised."""
    if not (module.training and getattr(module, SYNC_ATTRIBUTE, False) and distributed.active()):
        return _BatchNorm.forward(module, x)
    return _global_batch_norm(module, x)


def _global_batch_norm(module: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm over the union of every rank's batch."""
    channels = x.shape[1]
    dims = [0, *range(2, x.ndim)]
    values = x.to(torch.promote_types(x.dtype, torch.float32))
    count = values.new_tensor(float(values.numel() // channels))
    local_mean = values.mean(dims) if values.numel() else values.new_zeros(channels)
    centred = values - local_mean.view(1, channels, *([1] * (x.ndim - 2)))
    local_m2 = centred.pow(2).sum(dims)
    total, mean, m2 = global_moments(count, local_mean, local_m2)
    var = m2 / total
    if module.track_running_stats and module.running_mean is not None:
        update_running(module, mean.detach(), (m2 / (total - 1)).detach())
    shape = (1, channels, *([1] * (x.ndim - 2)))
    out = (values - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
    if module.affine:
        out = out * module.weight.view(shape) + module.bias.view(shape)
    return out.to(x.dtype)


def global_moments(
    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge this rank's ``count``, per-channel ``mean`` and centred sum of squares ``m2``.

    Returns the global count, mean and centred sum of squares over every
    rank (Chan et al.'s parallel formula), with gradient through the gather;
    outside a process group the inputs come back unchanged. All tensors, so
    no value leaves the device.
    """
    channels = mean.shape[0]
    stats = distributed.gather(torch.cat([count.view(1), mean, m2]).unsqueeze(0))
    counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + channels], stats[:, 1 + channels :]
    total = counts.sum()
    merged_mean = (counts * means).sum(0) / total
    merged_m2 = (m2s + counts * (means - merged_mean).pow(2)).sum(0)
    return total, merged_mean, merged_m2


@torch.no_grad()
def update_running(module: _BatchNorm, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    """Running statistics as ``nn.BatchNorm`` updates them (momentum or cumulative).

    The cumulative factor ``1 / num_batches_tracked`` stays a tensor, so the
    update never waits for the device.
    """
    module.num_batches_tracked.add_(1)
    if module.momentum is None:
        tracked = module.num_batches_tracked.to(module.running_mean.dtype)
        factor: float | torch.Tensor = 1.0 / tracked
    else:
        factor = module.momentum
    module.running_mean.lerp_(mean.to(module.running_mean.dtype), factor)
    module.running_var.lerp_(unbiased_var.to(module.running_var.dtype), factor)


def synchronize(model: nn.Module) -> int:
    """Make every BatchNorm of ``model`` use global statistics; returns how many.

    Layers that already have an instance-level ``forward`` (SparK's sparse
    BatchNorm) are only flagged: their forward calls :func:`batch_norm` itself.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, _BatchNorm):
            continue
        setattr(module, SYNC_ATTRIBUTE, True)
        if "forward" not in vars(module) and type(module).forward is _BatchNorm.forward:
            module.forward = partial(batch_norm, module)
        count += 1
    return count
