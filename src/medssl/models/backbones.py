"""Backbones and the encoder file format shared by every stage.

An *encoder* is a torchvision ResNet without its classifier: a plain state
dict whose keys are torchvision's (``conv1.weight``, ``layer1.0.bn1.bias``...),
saved with ``torch.save`` and loaded with ``weights_only=True``. A JSON
sidecar (``<encoder>.json``) names the backbone and channel count so the
fine-tuning stage can rebuild the right network. An RGB stem used on CT under
the ``repeat`` stem policy keeps its 3-channel weights; the sidecar then says
``"stem": "repeat"`` and ``stem_channels``, and :func:`load_encoder` rebuilds
the repeating stem.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock, ResNet

from medssl.core.files import read_json, save_torch, write_json
from medssl.core.registry import Registry


class SmallResNet(ResNet):
    """A narrow ResNet-10 (one BasicBlock per stage, widths 32-256) for CPU runs.

    Built from torchvision's own blocks and ``_make_layer`` so that its state
    dict keys are torchvision's; torchvision has no width argument for
    BasicBlock networks, hence the subclass.
    """

    def __init__(self, widths: tuple[int, int, int, int] = (32, 64, 128, 256)) -> None:
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, widths[0], 1)
        self.layer2 = self._make_layer(BasicBlock, widths[1], 1, stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], 1, stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], 1, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], 1000)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


BACKBONES: Registry[Callable[[], ResNet]] = Registry(
    "backbone",
    {
        "resnet_small": SmallResNet,
        "resnet18": partial(resnet18, weights=None),
        "resnet50": partial(resnet50, weights=None),
    },
)
"""Randomly initialised networks by name (``pretrain.backbone``, ``inits.<name>.backbone``)."""


def build_backbone(name: str, in_channels: int) -> ResNet:
    """A randomly initialised ResNet with ``in_channels`` input channels and no classifier.

    ``model.fc`` is ``nn.Identity`` so ``model(x)`` returns pooled features of
    size :func:`feature_dim`. An unknown ``name`` raises
    :class:`~medssl.core.registry.UnknownNameError`.
    """
    model = BACKBONES[name]()
    if in_channels != model.conv1.in_channels:
        stem = model.conv1
        model.conv1 = nn.Conv2d(
            in_channels,
            stem.out_channels,
            kernel_size=stem.kernel_size,
            stride=stem.stride,
            padding=stem.padding,
            bias=False,
        )
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


class ChannelRepeatConv2d(nn.Conv2d):
    """A stem convolution with ``weight_channels`` kernels that takes fewer input channels.

    The ``repeat`` stem policy keeps an ImageNet stem's three RGB kernels and
    feeds the CT channel(s) to all of them, tiled along the channel axis. A
    Conv2d subclass rather than a wrapper module so that the state dict keeps
    torchvision's ``conv1.weight`` and code reaching ``backbone.conv1`` (U-Net
    encoders, SparK's hooks) keeps working; ``in_channels`` is what it accepts.
    """

    def __init__(self, conv: nn.Conv2d, input_channels: int) -> None:
        weight_channels = int(conv.in_channels)
        if input_channels < 1 or weight_channels % input_channels:
            raise ValueError(
                f"repeat stem: {weight_channels} stem channels are not a multiple of "
                f"{input_channels} input channels"
            )
        super().__init__(
            weight_channels,
            conv.out_channels,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            bias=conv.bias is not None,
        )
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.weight_channels = weight_channels
        self.in_channels = input_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"stem takes {self.in_channels} channels, got {x.shape[1]}")
        return super().forward(x.repeat(1, self.weight_channels // self.in_channels, 1, 1))


def _stem_sum(model: ResNet, in_channels: int) -> ResNet:
    """Fold the stem over its input channels: one summed kernel per output channel.

    For a grey image (every RGB channel equal) this gives exactly the RGB
    stem's response, with a 1-channel convolution.
    """
    conv = model.conv1
    if in_channels != 1:
        raise ValueError(f"sum stem folds to 1 input channel; the data has {in_channels}")
    folded = nn.Conv2d(
        1,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        folded.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            folded.bias.copy_(conv.bias)
    model.conv1 = folded
    return model


def _stem_repeat(model: ResNet, in_channels: int) -> ResNet:
    """Keep the stem's kernels and tile the input channels to its width."""
    model.conv1 = ChannelRepeatConv2d(model.conv1, in_channels)
    return model


STEM_POLICIES: Registry[Callable[[ResNet, int], ResNet]] = Registry(
    "stem policy", {"sum": _stem_sum, "repeat": _stem_repeat}
)
"""How a stem trained on more channels (RGB) takes fewer (CT): see :func:`adapt_stem`."""


def adapt_stem(model: ResNet, in_channels: int, policy: str) -> ResNet:
    """Make ``model`` take ``in_channels`` inputs, in place; a no-op when it already does.

    ``sum`` folds the kernels to one channel (a 1-channel stem from then on,
    so continued training updates one kernel per output); ``repeat`` keeps the
    three kernels and repeats the input channel(s) at the stem (the encoder
    file keeps an RGB stem, usable again on RGB data). On a grey image both
    give the RGB stem's output up to float rounding (tested). The policy is
    looked up first, so a misspelt one fails even when no adaptation is needed.
    """
    adapt = STEM_POLICIES[policy]
    if int(model.conv1.in_channels) == in_channels:
        return model
    return adapt(model, in_channels)


def stem_channels(model: ResNet) -> int:
    """Channels of the stem's kernels (3 for a repeated RGB stem taking 1 channel)."""
    return int(getattr(model.conv1, "weight_channels", model.conv1.in_channels))


def feature_dim(model: ResNet) -> int:
    """Width of the pooled features the backbone returns."""
    return int(model.feature_dim)


def sidecar_path(encoder_path: str | Path) -> Path:
    """``results/init/x/encoder.pt`` -> ``results/init/x/encoder.json``."""
    return Path(encoder_path).with_suffix(".json")


def save_encoder(model: ResNet, path: str | Path, backbone: str, info: dict) -> None:
    """Save the backbone's weights (no classifier) and a sidecar describing them."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    in_channels = int(model.conv1.in_channels)
    stem = {}
    if stem_channels(model) != in_channels:
        # A repeated stem: the weights have more channels than the model takes.
        stem = {"stem": "repeat", "stem_channels": stem_channels(model)}
    save_torch(path, state)
    write_json(
        sidecar_path(path), {"backbone": backbone, "in_channels": in_channels, **stem, **info}
    )


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of an encoder file; names the file when it is missing."""
    side = sidecar_path(path)
    if not side.exists():
        raise FileNotFoundError(f"{path}: encoder has no sidecar {side.name} naming its backbone")
    return read_json(side)


def load_encoder(path: str | Path) -> tuple[ResNet, dict]:
    """Rebuild the backbone named in the sidecar and load the weights into it.

    Loading is strict: a key that is missing or unexpected means the file is
    not what its sidecar says, and silently random layers would poison results.
    """
    info = read_sidecar(path)
    in_channels = int(info["in_channels"])
    model = build_backbone(info["backbone"], int(info.get("stem_channels", in_channels)))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError and others for unsafe files
        raise ValueError(f"{path}: cannot load as a plain state dict ({err})") from err
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: does not match backbone {info['backbone']!r}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if info.get("stem") == "repeat":
        adapt_stem(model, in_channels, "repeat")
    return model, info
