"""Pre-training on timm backbones: a contrastive method per family, SparK on ConvNeXt."""

from __future__ import annotations

import pytest
import torch

from medssl.models import backbones as models
from medssl.pretraining.methods import build_method
from medssl.pretraining.methods.spark import stage_features


def _views(n: int, size: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, size, size, generator=generator) for _ in range(2)]


@pytest.mark.parametrize(("name", "size"), [("convnext_atto", 32), ("deit_tiny_patch16_224", 32)])
def test_simclr_steps_on_a_timm_backbone(name: str, size: int) -> None:
    torch.manual_seed(0)
    method = build_method("simclr", models.build_backbone(name, 1), {"proj_dim": 16})
    loss = method(_views(4, size, 0))
    loss.backward()
    assert torch.isfinite(loss)
    assert models.stem_conv(method.backbone).weight.grad.abs().sum() > 0


def test_vit_tokens_and_position_embedding_escape_weight_decay() -> None:
    method = build_method(
        "barlow_twins",
        models.build_backbone("deit_tiny_patch16_224", 1),
        {"proj_dims": [16, 16, 16]},
    )
    groups = method.optimizer_groups()
    exempt = {id(p) for p in groups[1]["params"]}
    assert id(method.backbone.pos_embed) in exempt and id(method.backbone.cls_token) in exempt
    assert id(method.backbone.patch_embed.proj.weight) not in exempt


def test_spark_steps_on_convnext_and_ignores_masked_pixels() -> None:
    torch.manual_seed(0)
    method = build_method("spark", models.build_backbone("convnext_atto", 1), {"decoder_width": 32})
    images = torch.randn(2, 1, 64, 64)
    loss = method([images])
    loss.backward()
    assert torch.isfinite(loss)
    assert models.stem_conv(method.backbone).weight.grad.abs().sum() > 0
    # Sparse semantics: every stage is zero at hidden positions, so a depth-wise
    # convolution cannot spread a LayerNorm's bias from hidden into visible cells.
    active = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    active[:, :, 0, 0] = True
    active[1, :, 1, 1] = True
    method.eval()
    for module in method.backbone.modules():  # trained norms have biases; fresh ones are 0
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.bias, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), method.mask_state.masking(active):
        visible = method.mask_state.at(64, 64)
        features = stage_features(method.backbone, images * visible)
        for feature in features:
            hidden = ~method.mask_state.at(*feature.shape[-2:])
            assert torch.count_nonzero(feature * hidden) == 0
            assert torch.count_nonzero(feature * ~hidden) > 0


def test_spark_refuses_a_transformer_naming_the_supported_backbones() -> None:
    with pytest.raises(ValueError, match="SparK needs a convolutional backbone.*convnext_tiny"):
        build_method("spark", models.build_backbone("deit_tiny_patch16_224", 1), {})


SMALL_HEADS = {
    "simclr": {"proj_dim": 16},
    "moco_v2": {"proj_dim": 16, "queue_size": 16},
    "byol": {"hidden_dim": 32, "proj_dim": 16},
    "swav": {"hidden_dim": 32, "proj_dim": 16, "n_prototypes": 8, "n_local_crops": 0},
    "barlow_twins": {"proj_dims": [16, 16, 16]},
}
"""Every contrastive method with narrow heads (and SwAV without local crops)."""


@pytest.mark.parametrize("method_name", sorted(SMALL_HEADS))
@pytest.mark.parametrize("backbone", ["convnext_atto", "deit_tiny_patch16_224"])
def test_every_contrastive_method_steps_on_a_timm_backbone(method_name: str, backbone: str) -> None:
    torch.manual_seed(0)
    method = build_method(method_name, models.build_backbone(backbone, 1), SMALL_HEADS[method_name])
    method.train()
    loss = method(_views(4, 32, 1))
    loss.backward()
    assert torch.isfinite(loss)
    assert models.stem_conv(method.backbone).weight.grad.abs().sum() > 0
