"""Backbones beyond ResNet, built by ``timm``: ConvNeXt, ViT (DeiT, DINOv2, CLIP, SAM) and Swin.

The names are timm's own model names (:data:`TIMM_BACKBONES`), so a published
checkpoint's keys are the keys of the network built here: the encoder file of
a timm backbone is the state dict of ``timm.create_model(name,
pretrained=False, num_classes=0, in_chans=...)``, the classifier removed and
``model(x)`` returning pooled features (what a classification head and the
contrastive methods need). Weights never come from timm's hub: every start is
random or an encoder file.

Families differ in what the rest of medssl needs from them:

* *hierarchical* (ConvNeXt, Swin): four stage outputs at strides 4-32, for the
  U-Net decoder (:class:`medssl.models.unet.TimmUNet`);
* *plain* ViTs (DeiT, DINOv2 with or without registers, the CLIP ViT-B/16
  tower, SAM's image encoder): token maps at one stride (the patch), taken
  from four blocks for the UNETR decoder (:mod:`medssl.models.unetr`).

Input sizes: ViTs are built with ``dynamic_img_size`` (their position
embedding is resampled to the input's grid), so any multiple of the patch
works; SAM's encoder always resamples. Swin is built with
``dynamic_img_size`` too (windows padded, masks computed per input), so any
multiple of 32 works with the parameter shapes of the 224-pixel network.
:func:`check_input_size` states the rules. timm is imported on first use: it
takes seconds, which a ResNet run should not pay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from medssl.core.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

HIERARCHICAL_FAMILIES = ("convnext", "swin")
"""Families with stage outputs at strides 4, 8, 16 and 32."""

PLAIN_FAMILIES = ("vit", "samvit")
"""Families with one token map per block, at the patch stride."""

STEM_PATHS = {
    "convnext": "stem.0",
    "vit": "patch_embed.proj",
    "samvit": "patch_embed.proj",
    "swin": "patch_embed.proj",
}
"""The first convolution of each family: the stem policies adapt it to CT's channel."""

TIMM_CLASSES = {
    "convnext": "timm.models.convnext.ConvNeXt",
    "vit": "timm.models.vision_transformer.VisionTransformer",
    "samvit": "timm.models.vision_transformer_sam.VisionTransformerSAM",
    "swin": "timm.models.swin_transformer.SwinTransformer",
}
"""The timm class of each family (``module.Class``), to recognise a built network."""


@dataclass(frozen=True)
class TimmSpec:
    """What medssl needs to know about one timm model name."""

    family: str
    patch: int
    """Stride of the first layer: the patch of a ViT or Swin, the ConvNeXt stem's 4."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keywords of ``timm.create_model`` every build passes (input-size behaviour)."""

    @property
    def hierarchical(self) -> bool:
        return self.family in HIERARCHICAL_FAMILIES

    @property
    def takes_img_size(self) -> bool:
        """Whether the network has a build-time image size (position embedding, windows)."""
        return self.family != "convnext"


_CONVNEXT = {"family": "convnext", "patch": 4}
_VIT16 = {"family": "vit", "patch": 16, "kwargs": {"dynamic_img_size": True}}
_VIT14 = {"family": "vit", "patch": 14, "kwargs": {"dynamic_img_size": True}}
_SWIN = {"family": "swin", "patch": 4, "kwargs": {"dynamic_img_size": True}}

TIMM_BACKBONES: Registry[TimmSpec] = Registry(
    "timm backbone",
    {
        "convnext_atto": TimmSpec(**_CONVNEXT),
        "convnext_tiny": TimmSpec(**_CONVNEXT),
        "convnext_small": TimmSpec(**_CONVNEXT),
        "convnext_base": TimmSpec(**_CONVNEXT),
        "deit_tiny_patch16_224": TimmSpec(**_VIT16),
        "deit_small_patch16_224": TimmSpec(**_VIT16),
        "deit_base_patch16_224": TimmSpec(**_VIT16),
        "vit_base_patch16_224": TimmSpec(**_VIT16),
        "vit_small_patch14_dinov2": TimmSpec(**_VIT14),
        "vit_base_patch14_dinov2": TimmSpec(**_VIT14),
        "vit_small_patch14_reg4_dinov2": TimmSpec(**_VIT14),
        "vit_base_patch14_reg4_dinov2": TimmSpec(**_VIT14),
        "samvit_base_patch16": TimmSpec(family="samvit", patch=16),
        "swin_tiny_patch4_window7_224": TimmSpec(**_SWIN),
        "swin_small_patch4_window7_224": TimmSpec(**_SWIN),
        "swin_base_patch4_window7_224": TimmSpec(**_SWIN),
    },
)
"""Supported timm models by name (``pretrain.backbone``, ``inits.<name>.backbone``).

``vit_base_patch16_224`` has the layout of open_clip's ViT-B/16 image tower
(BiomedCLIP), ``samvit_base_patch16`` that of SAM's (and MedSAM's) image encoder."""

HIERARCHICAL_STRIDE = 32
"""Total stride of ConvNeXt and Swin: the input must be a multiple of it."""


def timm_spec(name: str) -> TimmSpec:
    """The spec of a timm backbone name; an unknown name lists the known ones."""
    return TIMM_BACKBONES[name]


def family_of(model: nn.Module) -> str | None:
    """The timm family of a built network, or None when it is not a timm network."""
    cls = type(model)
    qualified = f"{cls.__module__}.{cls.__name__}"
    for family, name in TIMM_CLASSES.items():
        if qualified == name:
            return family
    return None


def build_timm_backbone(
    name: str, in_channels: int, *, drop_path: float = 0.0, img_size: int | list[int] | None = None
) -> nn.Module:
    """A randomly initialised timm network without classifier; ``model(x)`` gives pooled features.

    ``img_size`` is the build-time image size of ViTs and Swin (timm's
    default when None; it shapes the position embedding, so it must be the
    one the weights were trained with to load them). Stochastic depth is
    always set by :func:`set_timm_drop_path` (timm's own default for Swin is
    0.1; here 0 means none, for every family alike).
    """
    import timm

    spec = timm_spec(name)
    kwargs: dict[str, Any] = dict(spec.kwargs)
    if img_size is not None:
        if not spec.takes_img_size:
            raise ValueError(f"backbone {name!r} has no image size; got img_size={img_size}")
        kwargs["img_size"] = tuple(img_size) if isinstance(img_size, list) else int(img_size)
    model = timm.create_model(
        name,
        pretrained=False,
        num_classes=0,
        in_chans=int(in_channels),
        drop_path_rate=0.0,
        **kwargs,
    )
    model.feature_dim = int(model.num_features)
    set_timm_drop_path(model, drop_path)
    return model


def build_img_size(model: nn.Module) -> list[int] | None:
    """The build-time image size of a ViT or Swin (as :func:`build_timm_backbone` takes it)."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    return None if size is None else [int(s) for s in size]


def default_img_size(name: str) -> list[int] | None:
    """timm's default build-time image size of ``name`` (None for ConvNeXt)."""
    import timm

    if not timm_spec(name).takes_img_size:
        return None
    size = timm.get_pretrained_cfg(name).input_size[-2:]
    return [int(s) for s in size]


def _drop_path_slots(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """Every block and the attribute names of its stochastic-depth layers, in forward order."""
    slots = []
    for module in model.modules():
        names = [n for n in ("drop_path", "drop_path1", "drop_path2") if n in module._modules]
        if names:
            slots.append((module, names))
    return slots


def set_timm_drop_path(model: nn.Module, rate: float) -> nn.Module:
    """Stochastic depth rising linearly over the blocks to ``rate`` (timm's rule), in place.

    timm builds a block's ``drop_path`` layers once, from ``drop_path_rate``;
    replacing them keeps the state dict unchanged (they hold no parameters),
    so an encoder loaded from a file gets stochastic depth as a fresh build
    would. 0 removes it.
    """
    from timm.layers import DropPath
    from torch import nn

    from medssl.models.backbones import drop_path_rates

    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"backbone option drop_path must be in [0, 1), got {rate}")
    slots = _drop_path_slots(model)
    for (block, names), block_rate in zip(slots, drop_path_rates(len(slots), rate), strict=True):
        for attribute in names:
            layer = DropPath(block_rate) if block_rate > 0 else nn.Identity()
            setattr(block, attribute, layer)
    return model


def vit_block_indices(depth: int) -> list[int]:
    """The four blocks (0-based) whose tokens feed the UNETR decoder: each quarter's last.

    For 12 blocks, 2, 5, 8 and 11, UNETR's choice (and SAM's global-attention blocks).
    """
    if depth < 4:
        raise ValueError(f"a UNETR decoder needs at least 4 transformer blocks, got {depth}")
    return [depth * q // 4 - 1 for q in (1, 2, 3, 4)]


def feature_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Four NCHW feature maps, finest first: stage outputs, or token maps of four blocks.

    timm's ``forward_intermediates`` gives both (prefix tokens removed, no
    final norm), so medssl needs no per-family code for it.
    """
    family = family_of(model)
    if family in HIERARCHICAL_FAMILIES:
        return model.forward_intermediates(images, intermediates_only=True)
    if family in PLAIN_FAMILIES:
        indices = vit_block_indices(len(model.blocks))
        return model.forward_intermediates(images, indices=indices, intermediates_only=True)
    raise TypeError(f"not a timm backbone: {type(model).__name__}")


def feature_channels(model: nn.Module) -> list[int]:
    """Channels of the four maps of :func:`feature_maps`."""
    family = family_of(model)
    if family in HIERARCHICAL_FAMILIES:
        return [int(info["num_chs"]) for info in model.feature_info]
    if family in PLAIN_FAMILIES:
        return [int(model.embed_dim)] * 4
    raise TypeError(f"not a timm backbone: {type(model).__name__}")


def patch_size(model: nn.Module) -> int:
    """The patch (stride of the token grid) of a plain ViT."""
    return int(model.patch_embed.patch_size[0])


def check_timm_input_size(name: str, height: int, width: int) -> str | None:
    """Why a ``height x width`` input does not fit timm backbone ``name``, or None."""
    spec = timm_spec(name)
    if spec.hierarchical:
        if height % HIERARCHICAL_STRIDE or width % HIERARCHICAL_STRIDE:
            return (
                f"backbone {name} needs input sides that are multiples of "
                f"{HIERARCHICAL_STRIDE} (4 stages of stride 4-32), got {height}x{width}"
            )
        return None
    if height % spec.patch or width % spec.patch:
        return (
            f"backbone {name} needs input sides that are multiples of its patch "
            f"{spec.patch}, got {height}x{width}"
        )
    return None
