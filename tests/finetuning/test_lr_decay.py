"""Layer-wise lr decay: the lr of every layer, weight decay exemptions, groups that cover all."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from medssl.finetuning.lr_decay import layer_id, param_groups_with_decay
from medssl.models.backbones import build_backbone

BASE_LR, WEIGHT_DECAY, DECAY = 1e-3, 0.05, 0.5


def _tiny_vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_classes=0
    )


def _by_name(backbone: nn.Module, head: nn.Module, groups: list[dict]) -> dict[str, dict]:
    """Each parameter's group, by its name (``head.`` for the head's), checking it is in one."""
    owner: dict[int, dict] = {}
    for group in groups:
        for parameter in group["params"]:
            assert id(parameter) not in owner, "a parameter is in two groups"
            owner[id(parameter)] = group
    named = [*backbone.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]
    assert len(owner) == len(named), "a parameter is in no group"
    return {name: owner[id(parameter)] for name, parameter in named}


def test_vit_blocks_get_the_documented_lr_and_weight_decay() -> None:
    backbone, head = _tiny_vit(), nn.Linear(192, 2)
    groups = param_groups_with_decay(backbone, head, BASE_LR, WEIGHT_DECAY, DECAY)
    group = _by_name(backbone, head, groups)
    # 3 blocks: embeddings layer 0, block j layer j + 1, final norm and head layer 4.
    expected_lr = {
        "cls_token": DECAY**4,
        "pos_embed": DECAY**4,
        "patch_embed.proj.weight": DECAY**4,
        "blocks.0.attn.qkv.weight": DECAY**3,
        "blocks.1.mlp.fc1.weight": DECAY**2,
        "blocks.2.norm1.weight": DECAY**1,
        "norm.weight": 1.0,
        "head.weight": 1.0,
    }
    for name, scale in expected_lr.items():
        assert group[name]["lr"] == pytest.approx(BASE_LR * scale), name
    for name in ("cls_token", "pos_embed", "blocks.0.attn.qkv.bias", "norm.weight", "head.bias"):
        assert group[name]["weight_decay"] == 0.0, name
    for name in ("patch_embed.proj.weight", "blocks.2.mlp.fc2.weight", "head.weight"):
        assert group[name]["weight_decay"] == WEIGHT_DECAY, name
    assert {g["name"] for g in groups} == {"backbone", "head"}
    torch.optim.AdamW(groups, lr=BASE_LR, weight_decay=WEIGHT_DECAY)  # torch takes the groups


def test_vit_rule_against_timms_layer_decay_helper() -> None:
    """timm's BEiT-derived helper orders the layers the same and exempts the same parameters
    from weight decay, but counts the final norm into the last block's layer: each block's
    lr there is one ``decay`` higher than MAE's and BEiT's ``decay ** (n + 1 - layer)``."""
    backbone = _tiny_vit()
    ours = param_groups_with_decay(backbone, nn.Linear(192, 2), BASE_LR, WEIGHT_DECAY, DECAY)
    reference = param_groups_layer_decay(
        backbone,
        weight_decay=WEIGHT_DECAY,
        no_weight_decay_list=backbone.no_weight_decay(),
        layer_decay=DECAY,
    )

    def table(groups: list[dict]) -> dict[int, tuple[float, float]]:
        return {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}

    mine, timms = table([g for g in ours if g["name"] == "backbone"]), table(reference)
    assert mine.keys() == timms.keys()
    final_norm = {id(p) for n, p in backbone.named_parameters() if n.startswith("norm.")}
    for key, (scale, decay) in mine.items():
        timm_scale, timm_decay = timms[key]
        assert decay == timm_decay
        assert scale == pytest.approx(timm_scale if key in final_norm else timm_scale * DECAY)


def test_resnet_stages_decay_from_the_stem() -> None:
    backbone, head = build_backbone("resnet_small", 1), nn.Linear(256, 1)
    group = _by_name(backbone, head, param_groups_with_decay(backbone, head, 1.0, 0.0, DECAY))
    assert group["conv1.weight"]["lr"] == pytest.approx(DECAY**5)
    assert group["bn1.weight"]["lr"] == pytest.approx(DECAY**5)
    assert group["layer1.0.conv1.weight"]["lr"] == pytest.approx(DECAY**4)
    assert group["layer4.0.bn2.bias"]["lr"] == pytest.approx(DECAY**1)
    assert group["head.weight"]["lr"] == pytest.approx(1.0)


def test_hierarchical_transformers_decay_per_stage() -> None:
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=0)
    assert layer_id("stem.0.weight", "convnext", 4) == 0
    assert layer_id("stages.0.blocks.1.conv_dw.weight", "convnext", 4) == 1
    assert layer_id("stages.3.downsample.1.weight", "convnext", 4) == 4
    assert layer_id("head.norm.weight", "convnext", 4) == 5
    assert layer_id("layers.2.blocks.0.attn.qkv.weight", "swin", 4) == 3
    assert layer_id("patch_embed.proj.weight", "swin", 4) == 0
    assert layer_id("layer3.1.conv2.weight", "resnet", 4) == 3
    head = nn.Linear(320, 2)
    group = _by_name(convnext, head, param_groups_with_decay(convnext, head, 1.0, 0.1, DECAY))
    assert group["stem.0.weight"]["lr"] == pytest.approx(DECAY**5)
    assert group["stages.2.blocks.1.mlp.fc1.weight"]["lr"] == pytest.approx(DECAY**2)
    assert group["head.norm.weight"]["lr"] == pytest.approx(1.0)


def test_a_wrapped_timm_network_is_found_inside_its_wrapper() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = _tiny_vit()

    backbone, head = Wrapper(), nn.Linear(192, 2)
    group = _by_name(backbone, head, param_groups_with_decay(backbone, head, 1.0, 0.1, DECAY))
    assert group["model.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(DECAY**3)
    assert group["model.cls_token"]["weight_decay"] == 0.0


def test_decay_one_is_one_group_per_part_at_the_base_lr() -> None:
    backbone, head = _tiny_vit(), nn.Linear(192, 2)
    groups = param_groups_with_decay(backbone, head, BASE_LR, WEIGHT_DECAY, 1.0)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert all(g["lr"] == BASE_LR and g["weight_decay"] == WEIGHT_DECAY for g in groups)
    _by_name(backbone, head, groups)
    # A protocol that never trains the backbone leaves it out.
    only_head = param_groups_with_decay(None, head, BASE_LR, WEIGHT_DECAY, DECAY)
    assert {g["name"] for g in only_head} == {"head"}
    assert {g["lr"] for g in only_head} == {BASE_LR}


def test_bad_settings_and_unknown_networks_are_refused() -> None:
    head = nn.Linear(4, 1)
    with pytest.raises(ValueError, match=r"layer_decay must be a number in \(0, 1\]"):
        param_groups_with_decay(_tiny_vit(), head, BASE_LR, WEIGHT_DECAY, 1.5)
    with pytest.raises(ValueError, match="none of the known backbone families"):
        param_groups_with_decay(nn.Sequential(nn.Linear(4, 4)), head, BASE_LR, 0.0, DECAY)
    with pytest.raises(ValueError, match="block 5 is outside the 3 blocks"):
        layer_id("blocks.5.norm1.weight", "vit", 3)
    with pytest.raises(KeyError, match="did you mean 'vit'"):
        layer_id("blocks.0.norm1.weight", "vitt", 3)
