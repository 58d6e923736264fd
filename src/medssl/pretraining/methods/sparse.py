"""Sparse-convolution emulation on a dense torchvision ResNet (SparK's encoder side).

SparK treats the visible patches of a masked image as a sparse point set: a
convolution must neither see nor produce values at masked positions, and
BatchNorm statistics must come from visible positions only, or the zeros of
the masked area would drag every mean and variance towards zero. Real sparse
kernels are unnecessary: zeroing the masked positions after every
convolution, normalisation and pooling layer gives the same values on the
visible positions (the SparK paper's "sparse by masking" emulation).

The emulation is attached to the backbone in place, by forward hooks on its
convolutions and poolings and an instance-level ``forward`` on its BatchNorm
layers, instead of by swapping modules: the parameters and buffers stay the
backbone's own objects under their own names, so the exported encoder is a
plain torchvision state dict. While no mask is set (:class:`MaskState` holds
``None``) every patched layer behaves exactly as the dense original, so the
same backbone fine-tunes or evaluates densely after pre-training.

The sparse BatchNorm has two implementations (:data:`SPARSE_IMPLS`) that
give the same values: ``gather`` collects the visible positions into a
smaller batch and scatters the result back, as the official code does; its
boolean indexing has a data-dependent size, so on a GPU every BatchNorm
waits for the device to count the visible positions (50-odd waits per step
on ResNet-50). ``dense_masked`` (the default) computes the masked moments on
the full map, weighting by the mask and keeping the count as a tensor, then
normalises everywhere and re-masks: more arithmetic, no synchronisation, so
the host can queue the whole step ahead of the device.

A timm ConvNeXt (SparK's other encoder family) has no BatchNorm: its
LayerNorms and MLPs act on each position alone, so they cannot mix masked
positions into visible ones, but they turn a masked zero into a non-zero
value (the norm's bias) that the next depth-wise convolution would spread.
Re-masking the output of every ``LayerNorm2d`` and every block restores the
sparse values, as the official sparse ConvNeXt's masking does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medssl.core.registry import Registry
from medssl.pretraining import distributed, syncbn

SPARSE_HOOKED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
"""Layers whose output is zeroed at masked positions by a forward hook."""


@dataclass
class MaskState:
    """The visibility mask of the current forward pass, shared by every patched layer.

    ``active`` is a boolean ``(N, 1, h, w)`` tensor on the coarsest grid,
    True where a patch is visible, or ``None`` outside a masked pass.
    ``impl`` names the sparse BatchNorm implementation (:data:`SPARSE_IMPLS`).
    The mask at each resolution is computed once per pass and reused by
    every layer at that resolution.
    """

    active: torch.Tensor | None = None
    impl: str = "dense_masked"
    _cache: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        SPARSE_IMPLS[self.impl]  # fails early, naming the known implementations

    @contextmanager
    def masking(self, active: torch.Tensor) -> Iterator[None]:
        """Set ``active`` for the duration of one forward pass, then clear it even on error."""
        if active.dtype != torch.bool or active.ndim != 4 or active.shape[1] != 1:
            raise ValueError(
                f"mask must be bool (N, 1, h, w), got {active.dtype} {tuple(active.shape)}"
            )
        outer, outer_cache = self.active, self._cache
        self.active, self._cache = active, {}
        try:
            yield
        finally:
            self.active, self._cache = outer, outer_cache

    def at(self, height: int, width: int) -> torch.Tensor:
        """The boolean mask upsampled by nearest repetition to a ``height x width`` map.

        Every ResNet stage halves the resolution, so each feature map is an
        integer multiple of the coarsest grid; anything else is a caller bug.
        Built by broadcasting views (no data-dependent size), once per size.
        """
        active = self.active
        if active is None:
            raise RuntimeError("no mask is set")
        key = ("bool", height, width)
        if key not in self._cache:
            n, _, grid_h, grid_w = active.shape
            if height % grid_h or width % grid_w:
                raise ValueError(
                    f"feature map {height}x{width} is not a multiple of the mask grid "
                    f"{grid_h}x{grid_w}"
                )
            rows, cols = height // grid_h, width // grid_w
            grid = active[:, :, :, None, :, None].expand(n, 1, grid_h, rows, grid_w, cols)
            self._cache[key] = grid.reshape(n, 1, height, width)
        return self._cache[key]

    def weights(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`at` as 0/1 values of ``dtype``, to weight sums by visibility (cached)."""
        key = ("weights", height, width, dtype)
        if key not in self._cache:
            self._cache[key] = self.at(height, width).to(dtype)
        return self._cache[key]

    def count(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Number of visible positions at ``height x width``, a 0-d tensor kept on the device."""
        key = ("count", height, width, dtype)
        if key not in self._cache:
            self._cache[key] = self.weights(height, width, dtype).sum()
        return self._cache[key]


def _zero_masked(state: MaskState, module: nn.Module, inputs: Any, output: torch.Tensor) -> Any:
    """Forward hook: the layer's output with masked positions set to zero (None = unchanged)."""
    del module, inputs
    if state.active is None:
        return None
    return output * state.at(output.shape[-2], output.shape[-1])


def sparse_batch_norm(module: nn.BatchNorm2d, state: MaskState, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the visible positions of ``x`` only; masked positions come out zero.

    Batch statistics, running-statistic updates (momentum or cumulative,
    unbiased variance), ``num_batches_tracked`` and eval mode behave as
    torch's :class:`~torch.nn.BatchNorm2d` defines them, only over the M
    visible positions instead of all N*H*W. Under DDP with synchronised
    BatchNorm (:mod:`medssl.pretraining.syncbn`) the M positions are those of
    every rank, as in the official code's sparse sync BatchNorm. Dispatches
    to ``state.impl``.
    """
    if state.active is None:
        return syncbn.batch_norm(module, x)
    return SPARSE_IMPLS[state.impl](module, state, x)


def gather_batch_norm(module: nn.BatchNorm2d, state: MaskState, x: torch.Tensor) -> torch.Tensor:
    """The official code's way: the visible feature vectors as an ``(M, C, 1, 1)`` batch.

    The layer's own BatchNorm computation runs on that batch and the result
    is scattered back into zeros. The boolean indexing synchronises with a GPU.
    """
    visible = state.at(x.shape[-2], x.shape[-1])[:, 0]
    channels_last = x.permute(0, 2, 3, 1)
    normed = syncbn.batch_norm(module, channels_last[visible][:, :, None, None])
    out = torch.zeros_like(channels_last)
    out[visible] = normed[:, :, 0, 0].to(out.dtype)
    return out.permute(0, 3, 1, 2)


def masked_batch_norm(module: nn.BatchNorm2d, state: MaskState, x: torch.Tensor) -> torch.Tensor:
    """The same values as :func:`gather_batch_norm` with fixed shapes and no device sync.

    Moments over the visible positions are sums weighted by the 0/1 mask
    divided by the visible count (a tensor): the mean, then the biased
    variance of the centred values for normalising, and ``M / (M - 1)`` times
    it for the running variance, as torch does. Statistics are computed in at
    least float32 (as cuDNN's BatchNorm does for half inputs). Every position
    is normalised and the result re-masked. Written by hand because torch's
    BatchNorm kernels have no per-position weights.
    """
    height, width = x.shape[-2:]
    compute = torch.promote_types(x.dtype, torch.float32)
    visible = state.weights(height, width, compute)
    uses_batch_stats = module.training or module.running_mean is None
    if not uses_batch_stats:
        out = F.batch_norm(
            x, module.running_mean, module.running_var, module.weight, module.bias,
            False, 0.0, module.eps,
        )  # fmt: skip
        return out * visible.to(out.dtype)
    values = x.to(compute)
    count = state.count(height, width, compute)
    mean = (values * visible).sum((0, 2, 3)) / count
    centred = values - mean.view(1, -1, 1, 1)
    m2 = (centred.square() * visible).sum((0, 2, 3))
    if getattr(module, syncbn.SYNC_ATTRIBUTE, False) and distributed.active():
        count, mean, global_m2 = syncbn.global_moments(count, mean, m2)
        centred, m2 = values - mean.view(1, -1, 1, 1), global_m2
    if module.track_running_stats and module.running_mean is not None:
        # torch refuses a single value per channel; that check would need the
        # count on the host, so a lone visible position keeps a finite variance.
        unbiased = m2 / (count - 1).clamp_min(1)
        syncbn.update_running(module, mean.detach(), unbiased.detach())
    out = centred * torch.rsqrt(m2 / count + module.eps).view(1, -1, 1, 1)
    if module.affine:
        out = out * module.weight.view(1, -1, 1, 1) + module.bias.view(1, -1, 1, 1)
    return (out * visible).to(x.dtype)


SparseNorm = Callable[[nn.BatchNorm2d, MaskState, torch.Tensor], torch.Tensor]

SPARSE_IMPLS: Registry[SparseNorm] = Registry(
    "sparse implementation", {"gather": gather_batch_norm, "dense_masked": masked_batch_norm}
)
"""Sparse BatchNorm implementations by name (``spark.sparse_impl``); they agree to rounding."""


class SparseBatchNorm2d(nn.BatchNorm2d):
    """A stand-alone BatchNorm2d with the sparse behaviour, for layers SparK adds itself."""

    def __init__(self, num_features: int, state: MaskState) -> None:
        super().__init__(num_features)
        self.mask_state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See :func:`sparse_batch_norm`."""
        return sparse_batch_norm(self, self.mask_state, x)


def timm_masked_layers() -> tuple[type[nn.Module], ...]:
    """ConvNeXt's layers (timm) whose outputs are re-masked: ``LayerNorm2d`` and its blocks.

    Empty while timm is not imported: no network of this process can then be
    a timm one, and importing it would cost a ResNet run seconds.
    """
    if "timm" not in sys.modules:
        return ()
    from timm.layers import LayerNorm2d
    from timm.models.convnext import ConvNeXtBlock

    return (LayerNorm2d, ConvNeXtBlock)


def sparsify(model: nn.Module, state: MaskState) -> list[torch.utils.hooks.RemovableHandle]:
    """Make the conv, pooling and BatchNorm layers of ``model`` sparse while ``state`` has a mask.

    Returns the hook handles (the BatchNorm forwards are instance attributes,
    removable with ``del module.forward``). Adaptive pooling is left alone:
    SparK reads the stage outputs and never pools globally.
    """
    handles = []
    hooked = SPARSE_HOOKED + timm_masked_layers()
    for module in model.modules():
        if isinstance(module, hooked):
            handles.append(module.register_forward_hook(partial(_zero_masked, state)))
        elif isinstance(module, nn.BatchNorm2d) and not isinstance(module, SparseBatchNorm2d):
            if type(module) is not nn.BatchNorm2d:
                raise TypeError(f"cannot sparsify {type(module).__name__}; only nn.BatchNorm2d")
            module.forward = partial(sparse_batch_norm, module, state)
    return handles
