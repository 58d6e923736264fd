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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from medssl.pretraining import syncbn

SPARSE_HOOKED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
"""Layers whose output is zeroed at masked positions by a forward hook."""


@dataclass
class MaskState:
    """The visibility mask of the current forward pass, shared by every patched layer.

    ``active`` is a boolean ``(N, 1, h, w)`` tensor on the coarsest grid,
    True where a patch is visible, or ``None`` outside a masked pass.
    """

    active: torch.Tensor | None = None

    @contextmanager
    def masking(self, active: torch.Tensor) -> Iterator[None]:
        """Set ``active`` for the duration of one forward pass, then clear it even on error."""
        if active.dtype != torch.bool or active.ndim != 4 or active.shape[1] != 1:
            raise ValueError(
                f"mask must be bool (N, 1, h, w), got {active.dtype} {tuple(active.shape)}"
            )
        self.active = active
        try:
            yield
        finally:
            self.active = None

    def at(self, height: int, width: int) -> torch.Tensor:
        """The mask upsampled by nearest repetition to a ``height x width`` feature map.

        Every ResNet stage halves the resolution, so each feature map is an
        integer multiple of the coarsest grid; anything else is a caller bug.
        """
        active = self.active
        if active is None:
            raise RuntimeError("no mask is set")
        grid_h, grid_w = active.shape[-2:]
        if height % grid_h or width % grid_w:
            raise ValueError(
                f"feature map {height}x{width} is not a multiple of the mask grid {grid_h}x{grid_w}"
            )
        return active.repeat_interleave(height // grid_h, 2).repeat_interleave(width // grid_w, 3)


def _zero_masked(state: MaskState, module: nn.Module, inputs: Any, output: torch.Tensor) -> Any:
    """Forward hook: the layer's output with masked positions set to zero (None = unchanged)."""
    del module, inputs
    if state.active is None:
        return None
    return output * state.at(output.shape[-2], output.shape[-1])


def sparse_batch_norm(module: nn.BatchNorm2d, state: MaskState, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the visible positions of ``x`` only; masked positions come out zero.

    The visible feature vectors are gathered into an ``(M, C, 1, 1)`` batch and
    passed through the layer's own :class:`~torch.nn.BatchNorm2d` computation,
    so batch statistics, running-statistic updates (momentum or cumulative),
    ``num_batches_tracked`` and eval mode all behave as torch defines them,
    only over the M visible positions instead of all N*H*W. Under DDP with
    synchronised BatchNorm (:mod:`medssl.pretraining.syncbn`) the M positions are those of
    every rank, as in the official code's sparse sync BatchNorm.
    """
    if state.active is None:
        return syncbn.batch_norm(module, x)
    visible = state.at(x.shape[-2], x.shape[-1])[:, 0]
    channels_last = x.permute(0, 2, 3, 1)
    normed = syncbn.batch_norm(module, channels_last[visible][:, :, None, None])
    out = torch.zeros_like(channels_last)
    out[visible] = normed[:, :, 0, 0].to(out.dtype)
    return out.permute(0, 3, 1, 2)


class SparseBatchNorm2d(nn.BatchNorm2d):
    """A stand-alone BatchNorm2d with the sparse behaviour, for layers SparK adds itself."""

    def __init__(self, num_features: int, state: MaskState) -> None:
        super().__init__(num_features)
        self.mask_state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See :func:`sparse_batch_norm`."""
        return sparse_batch_norm(self, self.mask_state, x)


def sparsify(model: nn.Module, state: MaskState) -> list[torch.utils.hooks.RemovableHandle]:
    """Make the conv, pooling and BatchNorm layers of ``model`` sparse while ``state`` has a mask.

    Returns the hook handles (the BatchNorm forwards are instance attributes,
    removable with ``del module.forward``). Adaptive pooling is left alone:
    SparK reads the stage outputs and never pools globally.
    """
    handles = []
    for module in model.modules():
        if isinstance(module, SPARSE_HOOKED):
            handles.append(module.register_forward_hook(partial(_zero_masked, state)))
        elif isinstance(module, nn.BatchNorm2d) and not isinstance(module, SparseBatchNorm2d):
            if type(module) is not nn.BatchNorm2d:
                raise TypeError(f"cannot sparsify {type(module).__name__}; only nn.BatchNorm2d")
            module.forward = partial(sparse_batch_norm, module, state)
    return handles
