"""Publishers' files of modern encoders and of TensorFlow-trained ResNets, imported faithfully.

Each test writes a file in the publisher's layout from a randomly initialised
network, imports it as the stage does, and compares every tensor and the
features on a fixed input with the network it came from.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50

from medssl.models.checkpoint_formats import map_state_dict
from medssl.models.importing import (
    CheckpointImportError,
    _fit_positions,
    import_encoder,
    read_checkpoint,
)
from tests.models.test_padding import reference

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _features(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _same_tensors(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(source)
    for key, value in source.items():
        assert torch.equal(state[key], value), key


@pytest.fixture(scope="module")
def r50() -> nn.Module:
    torch.manual_seed(0)
    model = resnet50()
    model.fc = nn.Identity()
    return model.eval()


def _backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def separius(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision keys written back in Separius/SimCLRv2-Pytorch's layout (resnet.py)."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^conv1\.", "net.0.0.", key)
        key = re.sub(r"^bn1\.", "net.0.1.0.", key)
        key = re.sub(
            r"^layer(\d)\.(\d+)\.conv(\d)\.",
            lambda m: f"net.{m[1]}.blocks.{m[2]}.net.{2 * (int(m[3]) - 1)}.",
            key,
        )
        key = re.sub(
            r"^layer(\d)\.(\d+)\.bn(\d)\.",
            lambda m: f"net.{m[1]}.blocks.{m[2]}.net.{2 * int(m[3]) - 1}.0.",
            key,
        )
        key = re.sub(
            r"^layer(\d)\.(\d+)\.downsample\.0\.", r"net.\1.blocks.\2.projection.shortcut.", key
        )
        key = re.sub(
            r"^layer(\d)\.(\d+)\.downsample\.1\.", r"net.\1.blocks.\2.projection.bn.0.", key
        )
        out[key] = value
    return out


def test_simclr_v2_separius_file_imports_with_simclr_padding(r50, tmp_path: Path) -> None:
    state = _backbone_state(r50)
    layout = separius(state) | {"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.zeros(1000)}
    assert "net.1.blocks.0.net.3.0.running_var" in layout
    path = tmp_path / "r50_1x_sk0.pth"
    torch.save({"resnet": layout, "head": {"layers.0.weight": torch.randn(4, 2048)}}, path)
    model, report = import_encoder(path, "simclr_v2", backbone="resnet50", in_channels=3)
    assert report["container"] == "resnet" and report["padding"] == "tf_fixed"
    _same_tensors(model, state)
    torch.testing.assert_close(
        _features(model), reference(r50, X, "tf_fixed"), rtol=1e-4, atol=1e-5
    )


def test_simclr_v2_selective_kernel_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r50_1x_sk1.pth"
    sk = {
        "net.0.0.weight": torch.randn(32, 3, 3, 3),
        "net.1.blocks.0.net.2.main_conv.0.weight": torch.randn(128, 64, 3, 3),
    }
    torch.save({"resnet": sk, "head": {}}, path)
    with pytest.raises(CheckpointImportError, match=r"r50_1x_sk1\.pth.*selective-kernel.*sk0"):
        import_encoder(path, "simclr_v2", backbone="resnet50")


def test_byol_conversion_imports_with_same_padding(r50, tmp_path: Path) -> None:
    path = tmp_path / "pretrain_res50x1.pth.tar"
    torch.save(_backbone_state(r50), path)
    model, report = import_encoder(path, "byol", backbone="resnet50", in_channels=3)
    assert report["padding"] == "tf_same"
    torch.testing.assert_close(_features(model), reference(r50, X, "tf_same"), rtol=1e-4, atol=1e-5)


def test_dino_training_checkpoint_imports_the_teacher(r50, tmp_path: Path) -> None:
    state = _backbone_state(r50)
    teacher = {f"module.backbone.{k}": v for k, v in state.items()}
    teacher |= {"module.head.mlp.0.weight": torch.randn(8, 2048)}
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in state.items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": teacher, "student": student, "epoch": 3}, path)
    model, report = import_encoder(path, "dino", backbone="resnet50", in_channels=3)
    assert report["container"] == "teacher" and report["dropped"] == ["head.mlp.0.weight"]
    _same_tensors(model, state)
    torch.testing.assert_close(_features(model), _features(r50))


@pytest.mark.parametrize("wrapped", [True, False])
def test_radimagenet_sequential_layouts(r50, wrapped: bool, tmp_path: Path) -> None:
    """nn.Sequential(*resnet50.children()[:-1]): children 0, 1, 4-7 carry weights."""
    state = _backbone_state(r50)
    index = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    layout = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        layout[("backbone." if wrapped else "") + f"{index[head]}.{rest}"] = value
    path = tmp_path / "RadImageNet-ResNet50.pt"
    torch.save(layout, path)
    model, _ = import_encoder(path, "radimagenet", backbone="resnet50", in_channels=3)
    _same_tensors(model, state)


def _timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.mark.parametrize(
    ("name", "container"),
    [("convnext_atto", "state_dict"), ("deit_tiny_patch16_224", "state_dict_ema")],
)
def test_timm_checkpoint_with_head(name: str, container: str, tmp_path: Path) -> None:
    source = _timm(name)
    full = source.state_dict()
    assert any(k.startswith("head.") for k in full)
    path = tmp_path / f"{name}.pth.tar"
    torch.save({container: {f"module.{k}": v for k, v in full.items()}, "epoch": 1}, path)
    model, report = import_encoder(path, "timm", backbone=name, in_channels=3)
    assert report["dropped"] and all(k.startswith("head.") for k in report["dropped"])
    source.reset_classifier(0)
    _same_tensors(model, source.state_dict())
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_features(model, x), _features(source, x))


def dinov2_layout(state: dict[str, torch.Tensor], registers: bool) -> dict[str, torch.Tensor]:
    """timm's dinov2 keys written back as facebookresearch/dinov2 names them."""
    out = dict(state) | {"mask_token": torch.zeros(1, state["cls_token"].shape[-1])}
    if registers:
        # DINOv2 embeds a position for the cls token too; timm's register models fold it in.
        cls_position = torch.randn_like(state["cls_token"])
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = state["cls_token"] - cls_position
        out["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)
    return out


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_dinov2_hub_file(name: str, tmp_path: Path) -> None:
    source = _timm(name, num_classes=0, img_size=56)
    with torch.no_grad():  # timm starts the cls token near 0, where LayerNorm magnifies rounding
        source.cls_token.normal_()
    state = source.state_dict()
    registers = "reg4" in name
    layout = dinov2_layout(state, registers)
    assert layout["pos_embed"].shape[1] == 1 + 4 * 4  # DINOv2: cls position + patch grid
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(layout, path)
    model, _ = import_encoder(path, "dinov2", backbone=name, in_channels=3, img_size=56)
    for key, value in state.items():
        if key == "cls_token" and registers:  # x - p + p: equal up to rounding
            torch.testing.assert_close(model.state_dict()[key], value)
        else:
            assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_features(model, x), _features(source, x))


def test_dinov2_position_embedding_resampled_to_the_input_size(tmp_path: Path) -> None:
    """A 112-px (8 x 8) table imported for 56 px (4 x 4): bicubic over the patch grid."""
    source = _timm("vit_small_patch14_dinov2", num_classes=0, img_size=112)
    path = tmp_path / "dinov2.pth"
    torch.save(dinov2_layout(source.state_dict(), registers=False), path)
    model, _ = import_encoder(
        path, "dinov2", "vit_small_patch14_dinov2", in_channels=1, img_size=56
    )
    pos = source.pos_embed
    grid = pos[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    small = F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.cat([pos[:, :1], small.permute(0, 2, 3, 1).reshape(1, 16, -1)], dim=1)
    torch.testing.assert_close(model.pos_embed, expected)
    assert _features(model, torch.randn(1, 1, 56, 56)).shape == (1, 384)  # repeat stem


def test_biomedclip_trunk(tmp_path: Path) -> None:
    """open_clip's layout around a timm ViT trunk (a tiny one: the keys do not depend on size)."""
    trunk = _timm("vit_tiny_patch16_224", num_classes=0)
    state = trunk.state_dict()
    layout = {f"visual.trunk.{k}": v for k, v in state.items()} | {
        "visual.head.proj.weight": torch.randn(512, 192),
        "text.transformer.embeddings.word_embeddings.weight": torch.randn(10, 8),
        "logit_scale": torch.tensor(4.6),
    }
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(layout, path)
    mapped = map_state_dict(read_checkpoint(path), "biomedclip")
    model = _timm("vit_tiny_patch16_224", num_classes=0)
    model.load_state_dict(mapped.state, strict=True)
    _same_tensors(model, state)
    assert len(mapped.ignored) == 3


SAM_TINY = {
    "img_size": 64,
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 2,
    "global_attn_indexes": (1, 3),
}


def sam_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's samvit keys written back as segment_anything's image encoder names them."""
    encoder = {
        "image_encoder." + re.sub(r"\.mlp\.fc([12])\.", r".mlp.lin\1.", k): v
        for k, v in state.items()
    }
    return encoder | {
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.randn(2, 8),
        "mask_decoder.iou_token.weight": torch.randn(1, 8),
    }


def test_sam_image_encoder(tmp_path: Path) -> None:
    """SAM's layout around a small samvit (SAM ViT-B's keys, fewer and narrower blocks)."""
    source = _timm("samvit_base_patch16", num_classes=0, **SAM_TINY)
    state = source.state_dict()
    layout = sam_layout(state)
    assert "image_encoder.blocks.0.mlp.lin1.weight" in layout
    path = tmp_path / "medsam_vit_b.pth"
    torch.save({"model": layout}, path)
    mapped = map_state_dict(read_checkpoint(path), "sam")
    model = _timm("samvit_base_patch16", num_classes=0, **SAM_TINY)
    model.load_state_dict(mapped.state, strict=True)
    _same_tensors(model, state)
    torch.testing.assert_close(_features(model), _features(source))


def test_sam_position_tables_resampled() -> None:
    """A 128-px encoder's tables fitted to 64 px: NHWC positions and global relative positions."""
    big = _timm("samvit_base_patch16", num_classes=0, **(SAM_TINY | {"img_size": 128}))
    small = _timm("samvit_base_patch16", num_classes=0, **SAM_TINY)
    fitted = _fit_positions(big.state_dict(), small)
    for key, value in small.state_dict().items():
        assert fitted[key].shape == value.shape, key
    rel = big.state_dict()["blocks.1.attn.rel_pos_h"]  # global block: 2 * 8 - 1 -> 2 * 4 - 1
    expected = F.interpolate(rel.T[None], size=7, mode="linear")[0].T
    torch.testing.assert_close(fitted["blocks.1.attn.rel_pos_h"], expected)
    assert torch.equal(
        fitted["blocks.0.attn.rel_pos_h"], big.state_dict()["blocks.0.attn.rel_pos_h"]
    )
