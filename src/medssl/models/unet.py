"""2D U-Net: MONAI's U-Net decoder on the torchvision ResNet encoder every init provides.

Study B segments with a U-Net whose encoder is the pre-trained ResNet-50. The
decoder and head are MONAI's (``flexible_unet.UNetDecoder`` and
``SegmentationHead``, the blocks of ``FlexibleUNet``); only the encoder side is
written here, because ``FlexibleUNet`` builds its encoders from MONAI's own
registry and cannot take the torchvision state dicts that ``results/init``
holds. The encoder's five feature maps (strides 2, 4, 8, 16, 32) are the
stem's activation and ``layer1``..``layer4``, as in every ResNet U-Net.

The hierarchical timm backbones (ConvNeXt, Swin; :class:`TimmUNet`) have four
maps, at strides 4 to 32, and no stride-2 one: the same decoder runs with a
zero-width skip at stride 2, so its last two blocks upsample without skips.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from torch import nn
from torchvision.models.resnet import ResNet

from medssl.models import timm_backbones
from medssl.models.backbones import input_channels

DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)

UNET_STRIDE = 32
"""Total stride of every U-Net encoder here: inputs must be multiples of it."""


def encoder_channels(backbone: ResNet) -> list[int]:
    """Channels of the five feature maps, read from the layers (any ResNet width or depth)."""
    widths = [backbone.bn1.num_features]
    for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        block = layer[-1]
        last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
        widths.append(last_bn.num_features)
    return widths


def unet_head(
    encoder_channels: Sequence[int], out_channels: int, decoder_channels: Sequence[int]
) -> nn.ModuleDict:
    """MONAI's U-Net decoder and segmentation head for five encoder maps (strides 2-32).

    ``encoder_channels`` are the input's channels then the five maps', 0 for a
    map the encoder lacks (its skip is then never used).
    """
    if len(decoder_channels) != 5:
        raise ValueError(f"decoder_channels needs 5 widths, got {list(decoder_channels)}")
    # FlexibleUNet's defaults: nearest upsampling after a conv, BatchNorm, ReLU.
    decoder = UNetDecoder(
        spatial_dims=2,
        encoder_channels=list(encoder_channels),
        decoder_channels=list(decoder_channels),
        act=("relu", {"inplace": True}),
        norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
        dropout=0.0,
        bias=False,
        upsample="nontrainable",
        pre_conv="default",
        interp_mode="nearest",
        align_corners=None,
        is_pad=True,
    )
    head = SegmentationHead(
        spatial_dims=2,
        in_channels=decoder_channels[-1],
        out_channels=out_channels,
        kernel_size=3,
        act=None,
    )
    return nn.ModuleDict({"decoder": decoder, "segmentation": head})


def check_unet_input(images: torch.Tensor) -> None:
    """Refuse an input whose sides are not multiples of :data:`UNET_STRIDE`."""
    if images.shape[-1] % UNET_STRIDE or images.shape[-2] % UNET_STRIDE:
        raise ValueError(
            f"U-Net input must be a multiple of {UNET_STRIDE} pixels per side, "
            f"got {tuple(images.shape)}"
        )


class ResNetUNet(nn.Module):
    """Binary segmentation logits (N, 1, H, W) from a torchvision ResNet encoder.

    ``backbone`` is the encoder (the part the protocols freeze) and ``head`` the
    decoder plus the output convolution, so the fine-tuning protocols treat a
    U-Net exactly like a classifier. Inputs must be multiples of 32 pixels.
    """

    def __init__(
        self,
        backbone: ResNet,
        out_channels: int = 1,
        decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        channels = [backbone.conv1.in_channels, *encoder_channels(backbone)]
        self.head = unet_head(channels, out_channels, decoder_channels)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five encoder feature maps, finest first."""
        net = self.backbone
        x = net.relu(net.bn1(net.conv1(images)))
        stem = x
        x = net.layer1(net.maxpool(x))
        f1 = x
        f2 = net.layer2(f1)
        f3 = net.layer3(f2)
        f4 = net.layer4(f3)
        return [stem, f1, f2, f3, f4]

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Decoder and output convolution on precomputed encoder features."""
        return self.head["segmentation"](self.head["decoder"](features, skip_connect=4))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_unet_input(images)
        return self.decode(self.features(images))


class TimmUNet(nn.Module):
    """Binary segmentation logits (N, 1, H, W) from a ConvNeXt or Swin encoder (timm).

    The same parts as :class:`ResNetUNet` (``backbone`` to freeze, ``head`` =
    decoder + output convolution) and the same decoder, fed with the four
    stage outputs (strides 4-32) of timm's ``forward_intermediates``; the
    stride-2 skip is absent, so the decoder's last two blocks upsample alone.
    Inputs must be multiples of 32 pixels.
    """

    skip_connect = 3
    """Decoder blocks that take a skip: those ending at strides 16, 8 and 4."""

    def __init__(
        self,
        backbone: nn.Module,
        out_channels: int = 1,
        decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
    ) -> None:
        super().__init__()
        family = timm_backbones.family_of(backbone)
        if family not in timm_backbones.HIERARCHICAL_FAMILIES:
            raise TypeError(
                f"TimmUNet needs a ConvNeXt or Swin backbone, got {type(backbone).__name__}"
            )
        self.backbone = backbone
        stages = timm_backbones.feature_channels(backbone)
        self.head = unet_head(
            [input_channels(backbone), 0, *stages], out_channels, decoder_channels
        )

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs, finest (stride 4) first."""
        return timm_backbones.feature_maps(self.backbone, images)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Decoder and output convolution on precomputed encoder features."""
        # MONAI's decoder reads maps [stride 2, 4, 8, 16, 32]; the stride-2 entry
        # is a stand-in it never reads (skip_connect stops before it).
        maps = [features[0], *features]
        return self.head["segmentation"](self.head["decoder"](maps, skip_connect=self.skip_connect))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_unet_input(images)
        return self.decode(self.features(images))
