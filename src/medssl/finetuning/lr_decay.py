"""Layer-wise learning-rate decay: lower layers of a pre-trained encoder learn more slowly.

The fine-tuning recipe of BEiT, MAE and DINOv2: the layers are numbered from
the input (``layer_id``), and a parameter of layer ``i`` trains at
``base_lr * decay ** (n_layers + 1 - i)``. With ``n`` blocks:

* layer 0: what comes before the first block (patch embedding, class,
  distillation and register tokens, position embeddings; a ResNet's stem);
* layer ``j + 1``: block (or stage) ``j``, counted from 0;
* layer ``n + 1``: everything after the last block (final norm, pooling
  norm) and the task head, which train at ``base_lr``.

What a "block" is, per backbone family (:data:`FAMILIES`):

* ``vit`` (timm ``VisionTransformer``: ViT, DeiT, DINOv2): each transformer
  block ``blocks.N``, as MAE and BEiT number them.
* ``convnext`` (timm ``ConvNeXt``, ``stages.S.blocks.B``) and ``swin`` (timm
  ``SwinTransformer``, ``layers.S.blocks.B``): each *stage* ``S`` (with its
  downsampling), so ``n`` is 4. The decay then spans the network's four
  resolutions however deep one stage is, where per-block ids would give a
  ConvNeXt-T stem ``decay ** 19``; ConvNeXt's own recipe also groups its
  blocks (12 groups for depths 3-3-27-3) rather than decaying per block.
* ``resnet`` (torchvision and timm ResNets, ``layerK``): each stage
  ``layer1``..``layer4``; the stem (``conv1``, ``bn1``) is layer 0.

Weight decay follows the same recipes: biases, every other one-dimensional
parameter (norm scales and shifts) and the tokens and position embeddings
train without it (MAE, BEiT; timm's ``param_groups_layer_decay``, against
which the tests check the ViT rule).

``decay = 1.0`` (the ``finetune.layer_decay`` default) keeps the optimiser as
it was before this option existed: one group per part at ``base_lr``, every
parameter with ``weight_decay``.

The layer ids are hand-written rather than taken from timm's
``param_groups_layer_decay``: timm merges the final norm into the last
block's layer, so each block trains one ``decay`` faster than in MAE and BEiT
(the tests show the difference); it also counts ConvNeXt and Swin per block,
needs the head inside the model, returns scales rather than learning rates,
and cannot number torchvision ResNets (they have no ``group_matcher``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from medssl.core.registry import Registry, look_up

DEFAULT_LAYER_DECAY = 1.0
"""``finetune.layer_decay``: 1.0, no decay (every layer at the base lr)."""


@dataclass(frozen=True)
class Family:
    """How one backbone family names its layers.

    ``block``: a regular expression whose first group is the block (or stage)
    number in a parameter name; ``stem``: what lies before the first block;
    ``first``: the number the first block has in its name (0, or 1 for
    ``layer1``); ``no_decay``: names (besides 1-D parameters) without weight
    decay; ``count``: the number of blocks of a module of this family.
    """

    block: re.Pattern[str]
    stem: re.Pattern[str]
    first: int
    no_decay: re.Pattern[str]
    count: Callable[[nn.Module], int]


_TOKENS = re.compile(r"^(cls_token|reg_token|dist_token|pos_embed|absolute_pos_embed)$")
_NOTHING = re.compile(r"(?!)")

FAMILIES: Registry[Family] = Registry(
    "backbone family",
    {
        "vit": Family(
            re.compile(r"^blocks\.(\d+)\."),
            re.compile(r"^(cls_token|reg_token|dist_token|pos_embed|patch_embed\.|norm_pre\.)"),
            0,
            _TOKENS,
            lambda module: len(module.blocks),
        ),
        "convnext": Family(
            re.compile(r"^stages\.(\d+)\."),
            re.compile(r"^stem\."),
            0,
            _NOTHING,
            lambda module: len(module.stages),
        ),
        "swin": Family(
            re.compile(r"^layers\.(\d+)\."),
            re.compile(r"^(patch_embed\.|absolute_pos_embed)"),
            0,
            # Swin's relative position tables are embeddings too (timm's no_weight_decay).
            re.compile(r"(^absolute_pos_embed$|relative_position_bias_table$)"),
            lambda module: len(module.layers),
        ),
        "resnet": Family(
            re.compile(r"^layer(\d+)\."),
            re.compile(r"^(conv1|bn1)\."),
            1,
            _NOTHING,
            lambda module: 4,
        ),
    },
)
"""The backbone families whose layers have ids, by name."""


def layer_id(name: str, family: str, n_layers: int) -> int:
    """The layer of parameter ``name`` (relative to the backbone) in a ``family`` network.

    ``n_layers`` is the number of blocks (ViT) or stages (ConvNeXt, Swin,
    ResNet). The stem is 0, block ``j`` (from 0) is ``j + 1``, anything else
    (final norms, the head) ``n_layers + 1``.
    """
    rule = look_up("backbone family", family, FAMILIES)
    found = rule.block.match(name)
    if found:
        index = int(found.group(1)) - rule.first
        if not 0 <= index < n_layers:
            raise ValueError(
                f"parameter {name!r}: block {found.group(1)} is outside the "
                f"{n_layers} blocks of this {family} network"
            )
        return index + 1
    if rule.stem.match(name):
        return 0
    return n_layers + 1


def _family_classes() -> dict[str, tuple[type, ...]]:
    """The classes of each family, timm's imported only here (it takes about a second)."""
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import ResNet as TimmResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer
    from torchvision.models.resnet import ResNet

    return {
        "vit": (VisionTransformer,),
        "convnext": (ConvNeXt,),
        "swin": (SwinTransformer,),
        "resnet": (ResNet, TimmResNet),
    }


@dataclass(frozen=True)
class Layout:
    """Where a backbone's numbered network sits: its family, prefix and block count."""

    family: str
    prefix: str
    n_layers: int

    def layer_of(self, name: str) -> int:
        """The layer id of the backbone's parameter ``name``."""
        if self.prefix and not name.startswith(self.prefix):
            return self.n_layers + 1
        return layer_id(name[len(self.prefix) :], self.family, self.n_layers)

    def no_decay(self, name: str) -> bool:
        """True for a named embedding that trains without weight decay (besides 1-D ones)."""
        relative = name[len(self.prefix) :] if name.startswith(self.prefix) else name
        return bool(FAMILIES[self.family].no_decay.search(relative))


def backbone_layout(backbone: nn.Module) -> Layout:
    """The family of ``backbone`` (or of the first module inside it of a known family).

    A wrapper (``backbone.model`` a timm network) is found through its
    modules; the prefix is then ``model.``. Unknown networks are refused:
    decaying by a guessed layer order would silently train the wrong layers slowly.
    """
    classes = _family_classes()
    for prefix, module in backbone.named_modules():
        for family, types in classes.items():
            if isinstance(module, types):
                rule = FAMILIES[family]
                return Layout(family, f"{prefix}." if prefix else "", int(rule.count(module)))
    raise ValueError(
        f"layer-wise lr decay: {type(backbone).__name__} is none of the known backbone "
        f"families ({', '.join(sorted(FAMILIES))}); set finetune.layer_decay to 1.0"
    )


def check_layer_decay(decay: float) -> float:
    """``finetune.layer_decay`` as a float in (0, 1]; anything else names the setting."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise ValueError(f"finetune.layer_decay must be a number in (0, 1], got {decay!r}")
    return float(decay)


def _no_weight_decay(name: str, parameter: nn.Parameter, layout: Layout | None) -> bool:
    """Biases, norms (every 1-D parameter) and embeddings train without weight decay."""
    return parameter.ndim <= 1 or (layout is not None and layout.no_decay(name))


def _grouped(
    part: str,
    module: nn.Module,
    layout: Layout | None,
    top: int,
    base_lr: float,
    weight_decay: float,
    decay: float,
) -> list[dict[str, Any]]:
    """One group per (layer, with or without weight decay) of ``module``, in layer order."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in module.named_parameters():
        layer = top if layout is None else layout.layer_of(name)
        plain = _no_weight_decay(name, parameter, layout)
        if (layer, plain) not in groups:
            scale = decay ** (top - layer)
            groups[(layer, plain)] = {
                "name": part,
                "layer_id": layer,
                "lr_scale": scale,
                "lr": base_lr * scale,
                "weight_decay": 0.0 if plain else weight_decay,
                "params": [],
            }
        groups[(layer, plain)]["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


def param_groups_with_decay(
    model_backbone: nn.Module | None,
    head: nn.Module,
    base_lr: float,
    weight_decay: float,
    decay: float = DEFAULT_LAYER_DECAY,
) -> list[dict[str, Any]]:
    """Optimiser parameter groups with layer-wise lr decay and the recipes' weight decay.

    Every group has ``name`` (``backbone`` or ``head``: the part whose lr
    factor a protocol sets), ``layer_id``, ``lr_scale`` (``decay ** (top -
    layer_id)``), ``lr`` (``base_lr * lr_scale``), ``weight_decay`` and
    ``params``; every parameter is in exactly one group. ``model_backbone``
    None leaves the backbone out (a protocol that never trains it). With
    ``decay`` 1.0 the groups are one per part at ``base_lr`` with
    ``weight_decay`` throughout, the optimiser as without this option.
    """
    decay = check_layer_decay(decay)
    if decay == 1.0:
        parts = [("backbone", model_backbone), ("head", head)]
        return [
            {
                "name": part,
                "layer_id": 0,
                "lr_scale": 1.0,
                "lr": base_lr,
                "weight_decay": weight_decay,
                "params": list(module.parameters()),
            }
            for part, module in parts
            if module is not None
        ]
    groups: list[dict[str, Any]] = []
    top = 0
    if model_backbone is not None:
        layout = backbone_layout(model_backbone)
        top = layout.n_layers + 1
        groups += _grouped("backbone", model_backbone, layout, top, base_lr, weight_decay, decay)
    # The head sits on the last layer: it trains at base_lr (decay ** 0).
    groups += _grouped("head", head, None, top, base_lr, weight_decay, decay)
    return groups
