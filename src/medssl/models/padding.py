"""How a ResNet pads its strided layers: PyTorch's symmetric way or TensorFlow's.

Weights trained in TensorFlow or JAX/Haiku saw TensorFlow's padding, which is
not torchvision's, so the same weights in a torchvision ResNet compute other
features. ``SAME`` padding adds ``max((ceil(n / s) - 1) * s + k - n, 0)``
pixels along an axis of length ``n`` (kernel ``k``, stride ``s``), the
smaller half before and the larger half after; torchvision adds ``k // 2``
on both sides. The two agree at stride 1 (odd kernels), and for every 1x1
convolution, but not where the stride is 2 on an even input: the 7x7 stem
(SAME pads 2 before and 3 after a 224-pixel side, torchvision 3 and 3), the
3x3 max-pool and the 3x3 strided convolutions (SAME pads 0 before and 1
after, torchvision 1 and 1). The windows then sit one pixel apart.

Three variants (:data:`PADDINGS`, the ``padding`` of an encoder's sidecar):

``torch``
    torchvision's own (every PyTorch-trained publisher).
``tf_same``
    ``SAME`` on the stem convolution, the max-pool and every strided
    convolution: the network of JAX/Haiku BYOL (its converted PyTorch ResNet
    pads each of these layers the same way before a padding-free layer).
``tf_fixed``
    SimCLR v1/v2's TensorFlow ResNet: strided convolutions are padded by
    ``fixed_padding`` (``k - 1`` split ``(k - 1) // 2`` before, the rest
    after, then ``VALID``), which equals torchvision's for odd kernels; only
    the stem's max-pool is ``SAME``.

The variant is applied to a built network in place by forward pre-hooks that
pad the input, the layer's own padding set to 0. Hooks rather than other
module classes keep the state-dict keys and module types torchvision's
(stem policies and U-Net encoders reach ``model.conv1`` as before). A stem
replaced after :func:`set_padding` loses its hook, so the variant is applied
last, after the stem is adapted.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from medssl.core.registry import Registry

DEFAULT_PADDING = "torch"


def _pad_before(
    value: float, module: nn.Module, args: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    """Forward pre-hook: TensorFlow ``SAME`` padding of the layer's input (timm's helper)."""
    from timm.layers.padding import pad_same  # timm is slow to import; only padded nets need it

    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride)
    dilation = _pair(getattr(module, "dilation", 1))
    return (pad_same(args[0], kernel, stride, dilation, value), *args[1:])


def _pair(value: int | tuple[int, ...]) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def _strided_convolutions(model: nn.Module) -> list[nn.Conv2d]:
    """Convolutions whose ``SAME`` padding differs from torchvision's: stride > 1, kernel > 1."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and max(_pair(m.stride)) > 1 and max(_pair(m.kernel_size)) > 1
    ]


def _same_layers(model: nn.Module, name: str) -> list[tuple[nn.Module, float]]:
    """The layers variant ``name`` pads, each with its pad value.

    The max-pool pads with -inf, as TensorFlow's pooling ignores padded
    positions; convolutions pad with zeros.
    """
    pool = [(model.maxpool, float("-inf"))]
    if name == "tf_fixed":
        return pool
    convs = [(m, 0.0) for m in _strided_convolutions(model)]
    if model.conv1 not in [m for m, _ in convs]:
        convs.insert(0, (model.conv1, 0.0))
    return convs + pool


PADDINGS: Registry[str] = Registry(
    "padding",
    {
        "torch": "torchvision's symmetric padding",
        "tf_same": "TensorFlow SAME on the stem, the max-pool and every strided convolution",
        "tf_fixed": "SimCLR's fixed_padding convolutions, TensorFlow SAME max-pool",
    },
)
"""The padding variants by name, each with what it pads."""


def _remove(model: nn.Module) -> None:
    """Undo a previous :func:`set_padding`: drop the hooks, restore the layers' padding."""
    for module in model.modules():
        handle = getattr(module, "same_padding_hook", None)
        if handle is not None:
            handle.remove()
            module.padding = module.torch_padding
            del module.same_padding_hook, module.torch_padding


def set_padding(model: nn.Module, name: str) -> nn.Module:
    """Pad ``model`` (a torchvision-layout ResNet) the way variant ``name`` does, in place.

    Calling it again replaces the previous variant; ``torch`` restores
    torchvision's. The name is kept on the model as ``model.padding_variant``
    for :func:`padding_sidecar`. An unknown name raises
    :class:`~medssl.core.registry.UnknownNameError`.
    """
    PADDINGS[name]
    _remove(model)
    if name != DEFAULT_PADDING:
        for module, value in _same_layers(model, name):
            module.torch_padding = module.padding
            module.padding = 0 if isinstance(module, nn.MaxPool2d) else (0, 0)
            module.same_padding_hook = module.register_forward_pre_hook(partial(_pad_before, value))
    model.padding_variant = name
    return model


def padding_sidecar(model: nn.Module) -> dict[str, Any]:
    """``{"padding": name}`` for an encoder's sidecar; empty for torchvision's padding."""
    name = getattr(model, "padding_variant", DEFAULT_PADDING)
    return {} if name == DEFAULT_PADDING else {"padding": name}
