"""UNETR on plain timm ViTs: shapes for patch 16 and 14, the block choice, refusals."""

from __future__ import annotations

import pytest
import torch

from medssl.finetuning.tasktypes import task_type
from medssl.models import backbones as models
from medssl.models.timm_backbones import vit_block_indices
from medssl.models.unet import TimmUNet
from medssl.models.unetr import ViTUNETR


def test_block_indices_are_each_quarters_last() -> None:
    assert vit_block_indices(12) == [2, 5, 8, 11]
    assert vit_block_indices(24) == [5, 11, 17, 23]
    with pytest.raises(ValueError, match="at least 4 transformer blocks"):
        vit_block_indices(3)


@pytest.mark.parametrize(
    ("name", "size"), [("deit_tiny_patch16_224", 48), ("vit_small_patch14_dinov2", 42)]
)
def test_logits_have_the_input_size_for_patch_16_and_14(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = ViTUNETR(models.build_backbone(name, 1), out_channels=2, feature_size=8)
    images = torch.randn(1, 1, size, size)
    with torch.no_grad():
        features = model.features(images)
        assert [tuple(f.shape[-2:]) for f in features[1:]] == [(3, 3)] * 4
        assert model(images).shape == (1, 2, size, size)
    with pytest.raises(ValueError, match="multiple of the patch"):
        model(torch.randn(1, 1, size + 2, size))


def test_refuses_a_backbone_that_is_not_a_plain_vit() -> None:
    with pytest.raises(TypeError, match="plain timm ViT"):
        ViTUNETR(models.build_backbone("convnext_atto", 1))
    with pytest.raises(TypeError, match="ConvNeXt or Swin"):
        TimmUNet(models.build_backbone("deit_tiny_patch16_224", 1))


def test_segmentation_picks_the_decoder_by_family() -> None:
    seg = task_type("segmentation")
    resnet = seg.build_model(
        models.build_backbone("resnet_small", 1), 1, {"decoder_channels": None}
    )
    assert type(resnet).__name__ == "ResNetUNet"
    vit = models.build_backbone("deit_tiny_patch16_224", 1)
    assert isinstance(seg.build_model(vit, 1, {"decoder_channels": None}), ViTUNETR)
    with pytest.raises(ValueError, match="decoder_channels sets a U-Net decoder"):
        seg.build_model(vit, 1, {"decoder_channels": [8, 8, 8, 8, 8]})
    convnext = models.build_backbone("convnext_atto", 1)
    unet = seg.build_model(convnext, 1, {"decoder_channels": [16, 16, 8, 8, 8]})
    assert isinstance(unet, TimmUNet)
    with pytest.raises(ValueError, match="multiple of 32"):
        unet(torch.randn(1, 1, 48, 48))
