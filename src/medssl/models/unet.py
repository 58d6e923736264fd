"""2D U-Net: MONAI's U-Net decoder on the torchvision ResNet encoder every init provides.

Study B segments with a U-Net whose encoder is the pre-trained ResNet-50. The
decoder and head are MONAI's (``flexible_unet.UNetDecoder`` and
``SegmentationHead``, the blocks of ``FlexibleUNet``); only the encoder side is
written here, because ``FlexibleUNet`` builds its encoders from MONAI's own
registry and cannot take the torchvision state dicts that ``results/init``
holds. The encoder's five feature maps (strides 2, 4, 8, 16, 32) are the
stem's activation and ``layer1``..``layer4``, as in every ResNet U-Net.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from torch import nn
from torchvision.models.resnet import ResNet

DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)


def encoder_channels(backbone: ResNet) -> list[int]:
    """Channels of the five feature maps, read from the layers (any ResNet width or depth)."""
    widths = [backbone.bn1.num_features]
    for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        block = layer[-1]
        last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
        widths.append(last_bn.num_features)
    return widths


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
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 widths, got {list(decoder_channels)}")
        self.backbone = backbone
        channels = [backbone.conv1.in_channels, *encoder_channels(backbone)]
        # FlexibleUNet's defaults: nearest upsampling after a conv, BatchNorm, ReLU.
        decoder = UNetDecoder(
            spatial_dims=2,
            encoder_channels=channels,
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
        self.head = nn.ModuleDict({"decoder": decoder, "segmentation": head})

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
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise ValueError(
                f"U-Net input must be a multiple of 32 pixels per side, got {tuple(images.shape)}"
            )
        return self.decode(self.features(images))
