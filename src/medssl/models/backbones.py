"""Backbones and the encoder file format shared by every stage.

An *encoder* is a torchvision ResNet without its classifier: a plain state
dict whose keys are torchvision's (``conv1.weight``, ``layer1.0.bn1.bias``...),
saved with ``torch.save`` and loaded with ``weights_only=True``. A JSON
sidecar (``<encoder>.json``) names the backbone and channel count so the
fine-tuning stage can rebuild the right network. An RGB stem used on CT under
the ``repeat`` stem policy keeps its 3-channel weights; the sidecar then says
``"stem": "repeat"`` and ``stem_channels``, and :func:`load_encoder` rebuilds
the repeating stem.

Two training options of the network (:data:`BACKBONE_OPTION_DEFAULTS`), off
by default and turned on by SparK's recipe for random starts:
``zero_init_residual`` zero-initialises the last BatchNorm scale of every
residual block (torchvision's option), so each block starts as the identity;
``drop_path`` is stochastic depth on every block's residual branch, at a rate
rising linearly over the blocks to the value given (timm's rule, which the
official SparK backbones use). Neither adds parameters or buffers: the
encoder's keys stay torchvision's, and the sidecar records the options
(``backbone_options``) when they differ from the defaults.

Beyond ResNets, the timm families of :mod:`medssl.models.timm_backbones`
(ConvNeXt, ViT, Swin) go through the same functions: :func:`build_backbone`,
the stem policies (on a ConvNeXt stem or a patch embedding, the network's
first convolution, :func:`stem_conv`), :func:`save_encoder` /
:func:`load_encoder` (timm's keys; the sidecar adds ``img_size`` when a
ViT or Swin was built for another size than timm's default) and
:func:`feature_dim`. For them ``drop_path`` is timm's ``drop_path_rate``;
``zero_init_residual`` is refused (their blocks have no final BatchNorm;
ConvNeXt's layer scale starts near zero by design).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import StochasticDepth

from medssl.core.files import read_json, save_torch, write_json
from medssl.core.registry import Registry, look_up
from medssl.models import timm_backbones
from medssl.models.timm_backbones import TIMM_BACKBONES

BACKBONE_OPTION_DEFAULTS: dict[str, Any] = {"zero_init_residual": False, "drop_path": 0.0}
"""Training options of a backbone (``pretrain.backbone_options``) and their defaults."""


class SmallResNet(ResNet):
    """A narrow ResNet-10 (one BasicBlock per stage, widths 32-256) for CPU runs.

    Built from torchvision's own blocks and ``_make_layer`` so that its state
    dict keys are torchvision's; torchvision has no width argument for
    BasicBlock networks, hence the subclass.
    """

    def __init__(
        self,
        widths: tuple[int, int, int, int] = (32, 64, 128, 256),
        zero_init_residual: bool = False,
    ) -> None:
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
        if zero_init_residual:  # as torchvision's ResNet does with the same flag
            for block in residual_blocks(self):
                nn.init.zeros_(last_norm(block).weight)


BACKBONES: Registry[Callable[..., ResNet]] = Registry(
    "backbone",
    {
        "resnet_small": SmallResNet,
        "resnet18": partial(resnet18, weights=None),
        "resnet50": partial(resnet50, weights=None),
    },
)
"""Randomly initialised networks by name (``pretrain.backbone``, ``inits.<name>.backbone``).

Each takes torchvision's ``zero_init_residual`` keyword. The timm backbones are in
:data:`medssl.models.timm_backbones.TIMM_BACKBONES`; :func:`backbone_names` lists both."""


def backbone_names() -> list[str]:
    """Every backbone name :func:`build_backbone` accepts: the ResNets and the timm models."""
    return sorted([*BACKBONES, *TIMM_BACKBONES])


def is_timm_backbone(name: str) -> bool:
    """Whether ``name`` is built by timm (:data:`~medssl.models.timm_backbones.TIMM_BACKBONES`)."""
    return name in TIMM_BACKBONES


def _all_backbones() -> dict[str, str]:
    """Name -> kind of every backbone, for one look-up that lists them all on a miss."""
    return {**{n: "torchvision" for n in BACKBONES}, **{n: "timm" for n in TIMM_BACKBONES}}


def residual_blocks(model: nn.Module) -> list[BasicBlock | Bottleneck]:
    """The residual blocks of a ResNet in forward order (layer1 first)."""
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def last_norm(block: BasicBlock | Bottleneck) -> nn.BatchNorm2d:
    """The BatchNorm ending a block's residual branch (``bn2`` or ``bn3``)."""
    return block.bn3 if isinstance(block, Bottleneck) else block.bn2


def drop_path_rates(blocks: int, rate: float) -> list[float]:
    """Per-block stochastic depth: ``rate * i / (blocks - 1)``, 0 for the first block.

    timm's linear rule, as the official SparK ResNets use it; a single block
    gets ``rate``.
    """
    if blocks == 1:
        return [rate]
    return [rate * i / (blocks - 1) for i in range(blocks)]


def _drop_residual(
    drop: StochasticDepth, module: nn.Module, inputs: Any, output: torch.Tensor
) -> torch.Tensor:
    """Forward hook on a block's last BatchNorm: stochastic depth on the residual branch."""
    del module, inputs
    return drop(output)


def set_drop_path(model: ResNet, rate: float) -> ResNet:
    """Stochastic depth up to ``rate`` on the residual branches of ``model``, in place.

    Each block gets a ``drop_path`` :class:`torchvision.ops.StochasticDepth`
    (``row`` mode: the whole branch of one sample is dropped, the rest scaled
    by ``1 / (1 - p)``; the identity in eval mode), applied by a forward hook
    on the block's last BatchNorm, the end of the branch, before the shortcut
    is added. A hook rather than a wrapper keeps the state-dict keys
    torchvision's. Calling it again replaces the previous rates; 0 removes them.
    A timm network gets timm's own stochastic depth layers instead
    (:func:`~medssl.models.timm_backbones.set_timm_drop_path`).
    """
    if timm_backbones.family_of(model) is not None:
        timm_backbones.set_timm_drop_path(model, rate)
        _record_option(model, "drop_path", float(rate))
        return model
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"backbone option drop_path must be in [0, 1), got {rate}")
    blocks = residual_blocks(model)
    for block, block_rate in zip(blocks, drop_path_rates(len(blocks), rate), strict=True):
        handle = getattr(block, "drop_path_hook", None)
        if handle is not None:
            handle.remove()
            del block.drop_path_hook, block.drop_path
        if block_rate > 0:
            block.drop_path = StochasticDepth(block_rate, "row")
            block.drop_path_hook = last_norm(block).register_forward_hook(
                partial(_drop_residual, block.drop_path)
            )
    _record_option(model, "drop_path", rate)
    return model


def _record_option(model: nn.Module, key: str, value: Any) -> None:
    options = dict(getattr(model, "backbone_options", BACKBONE_OPTION_DEFAULTS))
    options[key] = value
    model.backbone_options = options


def resolve_backbone_options(
    settings: Mapping[str, Any] | None,
    recipe: Mapping[str, Any],
    random_start: bool,
    backbone: str | None = None,
) -> dict[str, Any]:
    """The backbone options of one pre-training run.

    ``settings`` are ``pretrain.backbone_options`` (a key that is absent or
    null takes the default), ``recipe`` the method's ``backbone_recipe``,
    which applies only to a backbone built from random weights. A start from
    an encoder file never zero-initialises (it would erase the imported
    blocks); an explicit ``drop_path`` still applies to it.

    ``backbone`` names the network when known: for a timm backbone a recipe's
    ``zero_init_residual`` (written for ResNets) is dropped, while an explicit
    ``true`` in ``settings`` is refused by :func:`build_backbone`.
    """
    settings = dict(settings or {})
    for key in sorted(set(settings) - set(BACKBONE_OPTION_DEFAULTS)):
        look_up("pretrain.backbone_options key", key, BACKBONE_OPTION_DEFAULTS)
    options = dict(BACKBONE_OPTION_DEFAULTS)
    if random_start:
        options.update(recipe)
        if backbone is not None and is_timm_backbone(backbone):
            options["zero_init_residual"] = False
    options.update({k: v for k, v in settings.items() if v is not None})
    if not random_start:
        options["zero_init_residual"] = False
    if not isinstance(options["zero_init_residual"], bool):
        raise ValueError(
            "pretrain.backbone_options.zero_init_residual must be true or false, "
            f"got {options['zero_init_residual']!r}"
        )
    options["drop_path"] = float(options["drop_path"])
    return options


def build_backbone(
    name: str,
    in_channels: int,
    *,
    zero_init_residual: bool = False,
    drop_path: float = 0.0,
    img_size: int | list[int] | None = None,
) -> nn.Module:
    """A randomly initialised backbone with ``in_channels`` input channels and no classifier.

    ``model(x)`` returns pooled features of size :func:`feature_dim` (a
    ResNet's ``fc`` is ``nn.Identity``; a timm network is built with
    ``num_classes=0``). ``zero_init_residual`` and ``drop_path`` are the
    options of :data:`BACKBONE_OPTION_DEFAULTS`, kept on the model as
    ``backbone_options``; ``img_size`` is the build-time size of a ViT or Swin
    (timm's default when None). An unknown ``name`` raises
    :class:`~medssl.core.registry.UnknownNameError` listing every backbone.
    """
    kind = look_up("backbone", name, _all_backbones())
    if kind == "timm":
        return _build_timm(name, in_channels, zero_init_residual, drop_path, img_size)
    if img_size is not None:
        raise ValueError(f"backbone {name!r} has no image size; got img_size={img_size}")
    model = BACKBONES[name](zero_init_residual=zero_init_residual)
    _record_option(model, "zero_init_residual", bool(zero_init_residual))
    set_drop_path(model, drop_path)
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


def _build_timm(
    name: str,
    in_channels: int,
    zero_init_residual: bool,
    drop_path: float,
    img_size: int | list[int] | None,
) -> nn.Module:
    """:func:`build_backbone` for a timm name: refuses the ResNet-only option."""
    if zero_init_residual:
        raise ValueError(
            f"backbone option zero_init_residual applies to ResNets only "
            f"({', '.join(sorted(BACKBONES))}); backbone {name!r} is a timm "
            f"{timm_backbones.timm_spec(name).family}: set "
            "pretrain.backbone_options.zero_init_residual to false"
        )
    model = timm_backbones.build_timm_backbone(
        name, in_channels, drop_path=drop_path, img_size=img_size
    )
    model.backbone_options = dict(BACKBONE_OPTION_DEFAULTS)
    _record_option(model, "drop_path", float(drop_path))
    return model


def stem_path(model: nn.Module) -> str:
    """Dotted name of the first convolution: ``conv1``, ``stem.0`` or ``patch_embed.proj``."""
    family = timm_backbones.family_of(model)
    return "conv1" if family is None else timm_backbones.STEM_PATHS[family]


def stem_conv(model: nn.Module) -> nn.Conv2d:
    """The first convolution, which the stem policies adapt to the data's channels."""
    return model.get_submodule(stem_path(model))


def _set_stem_conv(model: nn.Module, conv: nn.Conv2d) -> None:
    parent_path, _, attribute = stem_path(model).rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attribute, conv)


def input_channels(model: nn.Module) -> int:
    """Channels the backbone takes (1 for a repeated RGB stem on CT)."""
    return int(stem_conv(model).in_channels)


class ChannelRepeatConv2d(nn.Conv2d):
    """A stem convolution with ``weight_channels`` kernels that takes fewer input channels.

    The ``repeat`` stem policy keeps an ImageNet stem's three RGB kernels and
    feeds the CT channel(s) to all of them, tiled along the channel axis. A
    Conv2d subclass rather than a wrapper module so that the state dict keeps
    torchvision's ``conv1.weight`` and code reaching ``backbone.conv1`` (U-Net
    encoders, SparK's hooks) keeps working; ``in_channels`` is what it accepts.
    The same holds for a timm stem (``stem.0``) or patch embedding
    (``patch_embed.proj``).
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


def _stem_sum(model: nn.Module, in_channels: int) -> nn.Module:
    """Fold the stem over its input channels: one summed kernel per output channel.

    For a grey image (every RGB channel equal) this gives exactly the RGB
    stem's response, with a 1-channel convolution.
    """
    conv = stem_conv(model)
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
    _set_stem_conv(model, folded)
    return model


def _stem_repeat(model: nn.Module, in_channels: int) -> nn.Module:
    """Keep the stem's kernels and tile the input channels to its width."""
    _set_stem_conv(model, ChannelRepeatConv2d(stem_conv(model), in_channels))
    return model


STEM_POLICIES: Registry[Callable[[nn.Module, int], nn.Module]] = Registry(
    "stem policy", {"sum": _stem_sum, "repeat": _stem_repeat}
)
"""How a stem trained on more channels (RGB) takes fewer (CT): see :func:`adapt_stem`."""


def adapt_stem(model: nn.Module, in_channels: int, policy: str) -> nn.Module:
    """Make ``model`` take ``in_channels`` inputs, in place; a no-op when it already does.

    ``sum`` folds the kernels to one channel (a 1-channel stem from then on,
    so continued training updates one kernel per output); ``repeat`` keeps the
    three kernels and repeats the input channel(s) at the stem (the encoder
    file keeps an RGB stem, usable again on RGB data). On a grey image both
    give the RGB stem's output up to float rounding (tested). The policy is
    looked up first, so a misspelt one fails even when no adaptation is needed.
    """
    adapt = STEM_POLICIES[policy]
    if input_channels(model) == in_channels:
        return model
    return adapt(model, in_channels)


def stem_channels(model: nn.Module) -> int:
    """Channels of the stem's kernels (3 for a repeated RGB stem taking 1 channel)."""
    conv = stem_conv(model)
    return int(getattr(conv, "weight_channels", conv.in_channels))


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled features the backbone returns (any family)."""
    return int(model.feature_dim)


def check_input_size(backbone: str, height: int, width: int) -> str | None:
    """Why a ``height x width`` input cannot go through ``backbone``, in words, or None.

    ResNets take any size (the U-Net adds its own multiple-of-32 rule at run
    time); ConvNeXt and Swin need multiples of 32, ViTs multiples of their
    patch (14 or 16). An unknown name raises, listing the known ones.
    """
    kind = look_up("backbone", backbone, _all_backbones())
    if height < 1 or width < 1:
        return f"input size must be positive, got {height}x{width}"
    if kind == "timm":
        return timm_backbones.check_timm_input_size(backbone, height, width)
    return None


def sidecar_path(encoder_path: str | Path) -> Path:
    """``results/init/x/encoder.pt`` -> ``results/init/x/encoder.json``."""
    return Path(encoder_path).with_suffix(".json")


def _size_record(model: nn.Module, backbone: str) -> dict[str, Any]:
    """``{"img_size": [h, w]}`` when a ViT or Swin was built for another size than timm's."""
    if not is_timm_backbone(backbone):
        return {}
    size = timm_backbones.build_img_size(model)
    if size is None or size == timm_backbones.default_img_size(backbone):
        return {}
    return {"img_size": size}


def save_encoder(model: nn.Module, path: str | Path, backbone: str, info: dict) -> None:
    """Save the backbone's weights (no classifier) and a sidecar describing them."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    in_channels = input_channels(model)
    stem = {}
    if stem_channels(model) != in_channels:
        # A repeated stem: the weights have more channels than the model takes.
        stem = {"stem": "repeat", "stem_channels": stem_channels(model)}
    options = dict(getattr(model, "backbone_options", BACKBONE_OPTION_DEFAULTS))
    recorded = {}
    if options != BACKBONE_OPTION_DEFAULTS:
        recorded = {"backbone_options": options}
    save_torch(path, state)
    write_json(
        sidecar_path(path),
        {
            "backbone": backbone,
            "in_channels": in_channels,
            **stem,
            **_size_record(model, backbone),
            **recorded,
            **info,
        }
        | _padding_record(model),
    )


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of an encoder file; names the file when it is missing."""
    side = sidecar_path(path)
    if not side.exists():
        raise FileNotFoundError(f"{path}: encoder has no sidecar {side.name} naming its backbone")
    return read_json(side)


def load_encoder(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the backbone named in the sidecar and load the weights into it.

    The network is built with the default options (no stochastic depth):
    ``backbone_options`` in the sidecar describe how the weights were
    trained, not how the next stage must use them.

    Loading is strict: a key that is missing or unexpected means the file is
    not what its sidecar says, and silently random layers would poison results.
    """
    info = read_sidecar(path)
    in_channels = int(info["in_channels"])
    model = build_backbone(
        info["backbone"],
        int(info.get("stem_channels", in_channels)),
        img_size=info.get("img_size"),
    )
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
    _padding_variant(model, info)
    return model, info


def _padding_record(model: nn.Module) -> dict[str, Any]:
    """``{"padding": ...}`` for a network padded TensorFlow's way (medssl.models.padding)."""
    from medssl.models.padding import padding_sidecar

    return padding_sidecar(model)


def _padding_variant(model: nn.Module, info: Mapping[str, Any]) -> nn.Module:
    """Pad ``model`` as the sidecar's ``padding`` says (torchvision's when absent).

    Applied after the stem is adapted, as :func:`medssl.models.padding.set_padding` asks.
    """
    if "padding" not in info:
        return model
    from medssl.models.padding import set_padding

    return set_padding(model, str(info["padding"]))
