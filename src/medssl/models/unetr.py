"""UNETR (Hatamizadeh et al., WACV 2022) in 2-D on a plain timm ViT: segmentation from tokens.

A plain ViT has one resolution (the patch grid), so a U-Net's skips from
several strides do not exist. UNETR takes the tokens of four blocks (each
quarter's last, :func:`medssl.models.timm_backbones.vit_block_indices`) as
maps on the patch grid, brings the three shallower ones up by transposed
convolutions (8x, 4x, 2x), and decodes from the deepest one, doubling the
resolution four times and adding one skip each time; the last skip is a
convolution of the image itself. Every block is MONAI's (the ones its
``UNETR`` network uses), with its defaults: feature size 16, instance norm,
residual blocks. MONAI's ``UNETR`` itself cannot be used: it builds its own
ViT, not a timm one whose weights the encoder files hold.

Four doublings make a stride of 16: for a patch of 14 the decoder's last
upsampling lands at 16/14 of the input and is resampled (bilinear) to the
image skip's size before they are joined, so any multiple of the patch works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from medssl.models import timm_backbones
from medssl.models.backbones import input_channels

DEFAULT_FEATURE_SIZE = 16
"""UNETR's width at full resolution (MONAI's default); x2, x4, x8 at the coarser skips."""

NORM = "instance"


class ViTUNETR(nn.Module):
    """Binary segmentation logits (N, 1, H, W) from a plain timm ViT (DeiT, DINOv2, CLIP, SAM).

    ``backbone`` is the ViT (what the protocols freeze) and ``head`` every
    UNETR block, so the fine-tuning protocols treat it as a classifier.
    Inputs must be multiples of the patch.
    """

    def __init__(
        self, backbone: nn.Module, out_channels: int = 1, feature_size: int = DEFAULT_FEATURE_SIZE
    ) -> None:
        super().__init__()
        if timm_backbones.family_of(backbone) not in timm_backbones.PLAIN_FAMILIES:
            raise TypeError(f"ViTUNETR needs a plain timm ViT, got {type(backbone).__name__}")
        self.backbone = backbone
        self.patch = timm_backbones.patch_size(backbone)
        hidden = timm_backbones.feature_channels(backbone)[-1]
        fs = int(feature_size)
        common = {"spatial_dims": 2, "norm_name": NORM, "res_block": True}

        def skip(channels: int, doublings: int) -> UnetrPrUpBlock:
            return UnetrPrUpBlock(
                in_channels=hidden,
                out_channels=channels,
                num_layer=doublings - 1,
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                conv_block=True,
                **common,
            )

        def up(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(
                in_channels=cin, out_channels=cout, kernel_size=3, upsample_kernel_size=2, **common
            )

        self.head = nn.ModuleDict(
            {
                "image_skip": UnetrBasicBlock(
                    in_channels=input_channels(backbone),
                    out_channels=fs,
                    kernel_size=3,
                    stride=1,
                    **common,
                ),
                "skip1": skip(fs * 2, 3),  # shallowest tokens, 8x up
                "skip2": skip(fs * 4, 2),
                "skip3": skip(fs * 8, 1),
                "up4": up(hidden, fs * 8),
                "up3": up(fs * 8, fs * 4),
                "up2": up(fs * 4, fs * 2),
                "up1": up(fs * 2, fs),
                "out": UnetOutBlock(spatial_dims=2, in_channels=fs, out_channels=out_channels),
            }
        )

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The image (for the full-resolution skip) and four token maps, shallowest first."""
        return [images, *timm_backbones.feature_maps(self.backbone, images)]

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Every UNETR block on precomputed :meth:`features`."""
        images, tokens1, tokens2, tokens3, tokens4 = features
        head = self.head
        x = head["up4"](tokens4, head["skip3"](tokens3))
        x = head["up3"](x, head["skip2"](tokens2))
        x = head["up2"](x, head["skip1"](tokens1))
        x = self._last_up(x, head["image_skip"](images))
        return head["out"](x)

    def _last_up(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``up1`` (MONAI's UnetrUpBlock), resampling to the skip's size for a patch not 16."""
        block = self.head["up1"]
        upsampled = block.transp_conv(x)
        if upsampled.shape[-2:] != skip.shape[-2:]:
            upsampled = F.interpolate(
                upsampled, size=skip.shape[-2:], mode="bilinear", align_corners=False
            )
        return block.conv_block(torch.cat((upsampled, skip), dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if height % self.patch or width % self.patch:
            raise ValueError(
                f"UNETR input must be a multiple of the patch ({self.patch} pixels) per side, "
                f"got {tuple(images.shape)}"
            )
        return self.decode(self.features(images))
