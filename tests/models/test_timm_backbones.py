"""timm backbones (ConvNeXt, ViT, Swin): build, train, save and reload, stems, input sizes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import DropPath

from medssl.core.files import read_json
from medssl.finetuning.tasktypes import Classifier, task_type
from medssl.models import backbones as models
from medssl.models import timm_backbones

CASES = [
    ("convnext_atto", 32),
    ("deit_tiny_patch16_224", 32),
    ("vit_small_patch14_reg4_dinov2", 28),
    ("swin_tiny_patch4_window7_224", 32),
]
"""One CPU-sized network per family (DINOv2 with registers for patch 14) and a fitting size."""

SEG_SETTINGS = {"decoder_channels": [32, 16, 16, 8, 8]}


def _images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _stem_grad(model: torch.nn.Module) -> float:
    grad = models.stem_conv(model).weight.grad
    return 0.0 if grad is None else float(grad.abs().sum())


def test_every_registered_name_is_a_timm_model_and_listed() -> None:
    known = set(timm.list_models())
    assert set(timm_backbones.TIMM_BACKBONES) <= known
    names = models.backbone_names()
    assert {
        "resnet50",
        "convnext_base",
        "vit_base_patch14_reg4_dinov2",
        "samvit_base_patch16",
    } <= set(names)
    assert names == sorted(names)
    families = {spec.family for spec in timm_backbones.TIMM_BACKBONES.values()}
    assert families == {"convnext", "vit", "samvit", "swin"}


@pytest.mark.parametrize(("name", "size"), CASES)
def test_builds_from_its_name_for_one_and_three_channels(name: str, size: int) -> None:
    for channels in (1, 3):
        torch.manual_seed(0)
        net = models.build_backbone(name, channels)
        assert models.input_channels(net) == channels
        assert net(_images(2, channels, size)).shape == (2, models.feature_dim(net))


@pytest.mark.parametrize(("name", "size"), CASES)
def test_classification_trains_two_steps(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = Classifier(models.build_backbone(name, 1), 2)
    images, labels = _images(4, 1, size), torch.tensor([0, 1, 0, 1])
    # Plain gradient descent with a small step lowers the loss; Adam's first
    # step moves every weight by the full rate and need not.
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(2):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        losses.append(float(loss.detach()))
        assert _stem_grad(model.backbone) > 0
        optimiser.step()
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(("name", "size"), CASES)
def test_segmentation_trains_two_steps_with_the_family_decoder(name: str, size: int) -> None:
    torch.manual_seed(0)
    backbone = models.build_backbone(name, 1)
    plain = timm_backbones.timm_spec(name).family in timm_backbones.PLAIN_FAMILIES
    settings = {"decoder_channels": None} if plain else SEG_SETTINGS
    model = task_type("segmentation").build_model(backbone, 1, settings)
    assert type(model).__name__ == ("ViTUNETR" if plain else "TimmUNet")
    images = _images(2, 1, size)
    masks = (images > 0.5).float()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        optimiser.zero_grad()
        logits = model(images)
        assert logits.shape == (2, 1, size, size)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
        loss.backward()
        losses.append(float(loss.detach()))
        assert _stem_grad(backbone) > 0
        optimiser.step()
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.decode(model.features(images)), model(images))


@pytest.mark.parametrize(("name", "size"), CASES)
def test_encoder_file_reloads_with_equal_outputs(name: str, size: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = models.build_backbone(name, 1).eval()
    path = tmp_path / "encoder.pt"
    models.save_encoder(net, path, name, {"method": "test"})
    sidecar = read_json(models.sidecar_path(path))
    assert sidecar["backbone"] == name and sidecar["in_channels"] == 1
    assert "img_size" not in sidecar  # timm's default size needs no record
    state = torch.load(path, weights_only=True)
    reference = timm.create_model(name, pretrained=False, num_classes=0, in_chans=1)
    assert set(state) == set(reference.state_dict())
    loaded, info = models.load_encoder(path)
    images = _images(2, 1, size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), net(images))
    assert info["method"] == "test"


@pytest.mark.parametrize(("name", "size"), CASES)
def test_sum_and_repeat_stems_agree_with_rgb_on_a_grey_image(
    name: str, size: int, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    rgb = models.build_backbone(name, 3).eval()
    grey = _images(2, 1, size, seed=2)
    summed = models.adapt_stem(copy.deepcopy(rgb), 1, "sum")
    repeated = models.adapt_stem(copy.deepcopy(rgb), 1, "repeat")
    assert models.stem_conv(summed).weight.shape[1] == 1
    assert models.stem_channels(repeated) == 3 and models.input_channels(repeated) == 1
    with torch.no_grad():
        expected = rgb(grey.repeat(1, 3, 1, 1))
        torch.testing.assert_close(summed(grey), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(repeated(grey), expected, rtol=1e-4, atol=1e-4)
    path = tmp_path / "repeat.pt"
    models.save_encoder(repeated, path, name, {})
    sidecar = read_json(models.sidecar_path(path))
    assert sidecar["stem"] == "repeat" and sidecar["stem_channels"] == 3
    loaded, _ = models.load_encoder(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(grey), expected, rtol=1e-4, atol=1e-4)


def test_a_vit_built_for_the_slice_size_records_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = models.build_backbone("deit_tiny_patch16_224", 1, img_size=64).eval()
    assert net.pos_embed.shape[1] == 1 + 4 * 4
    path = tmp_path / "encoder.pt"
    models.save_encoder(net, path, "deit_tiny_patch16_224", {})
    assert read_json(models.sidecar_path(path))["img_size"] == [64, 64]
    loaded, _ = models.load_encoder(path)
    images = _images(1, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), net(images))
    with pytest.raises(ValueError, match="has no image size"):
        models.build_backbone("convnext_atto", 1, img_size=64)
    with pytest.raises(ValueError, match="has no image size"):
        models.build_backbone("resnet_small", 1, img_size=64)


def test_check_input_size_names_the_rule() -> None:
    assert models.check_input_size("deit_tiny_patch16_224", 64, 224) is None
    assert models.check_input_size("vit_base_patch14_dinov2", 224, 224) is None
    assert models.check_input_size("convnext_tiny", 224, 96) is None
    assert models.check_input_size("resnet50", 100, 100) is None
    problem = models.check_input_size("vit_small_patch14_dinov2", 64, 64)
    assert problem is not None and "multiples of its patch 14" in problem and "64x64" in problem
    problem = models.check_input_size("swin_tiny_patch4_window7_224", 224, 200)
    assert problem is not None and "multiples of 32" in problem
    assert "multiples of 32" in models.check_input_size("convnext_atto", 48, 64)
    assert "positive" in models.check_input_size("resnet18", 0, 64)
    with pytest.raises(KeyError, match="did you mean 'convnext_tiny'"):
        models.check_input_size("convnext_tiny2", 64, 64)


def test_drop_path_is_timm_stochastic_depth_and_zero_init_is_refused() -> None:
    torch.manual_seed(0)
    plain = models.build_backbone("swin_tiny_patch4_window7_224", 1)
    assert not any(isinstance(m, DropPath) for m in plain.modules())  # timm's 0.1 is not kept
    net = models.build_backbone("convnext_atto", 1, drop_path=0.1)
    rates = [m.drop_prob for m in net.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx(models.drop_path_rates(len(rates) + 1, 0.1)[1:])
    assert set(net.state_dict()) == set(models.build_backbone("convnext_atto", 1).state_dict())
    assert net.backbone_options == {"zero_init_residual": False, "drop_path": 0.1}
    models.set_drop_path(net, 0.0)
    assert not any(isinstance(m, DropPath) for m in net.modules())
    with pytest.raises(ValueError, match="zero_init_residual applies to ResNets only"):
        models.build_backbone("deit_tiny_patch16_224", 1, zero_init_residual=True)
    recipe = {"zero_init_residual": True, "drop_path": 0.05}
    options = models.resolve_backbone_options({}, recipe, True, backbone="convnext_atto")
    assert options == {"zero_init_residual": False, "drop_path": 0.05}
    resnet = models.resolve_backbone_options({}, recipe, True, backbone="resnet50")
    assert resnet["zero_init_residual"] is True


def test_sam_image_encoder_builds_pools_and_segments() -> None:
    torch.manual_seed(0)
    net = models.build_backbone("samvit_base_patch16", 1)
    images = _images(1, 1, 32)
    with torch.no_grad():
        assert net(images).shape == (1, models.feature_dim(net)) == (1, 256)
        model = task_type("segmentation").build_model(net, 1, {"decoder_channels": None})
        assert model(images).shape == (1, 1, 32, 32)
