"""Backbones by name, stem policies for RGB stems on CT, and the encoder file they travel in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from medssl.core.registry import UnknownNameError
from medssl.models import backbones as models


def _rgb_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    net = resnet18().eval()
    net.feature_dim = net.fc.in_features
    net.fc = torch.nn.Identity()
    return net


@pytest.mark.parametrize("policy", sorted(models.STEM_POLICIES))
def test_policy_on_grey_equals_rgb_stem(policy: str, one_thread) -> None:
    """A grey CT slice through the adapted stem = the same slice as RGB through the original."""
    rgb = _rgb_backbone()
    grey = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        expected = rgb(grey.expand(-1, 3, -1, -1))
        adapted = models.adapt_stem(_rgb_backbone(), 1, policy).eval()
        assert adapted.conv1.in_channels == 1
        torch.testing.assert_close(adapted(grey), expected, rtol=1e-5, atol=1e-5)


def test_sum_and_repeat_agree_and_differ_in_weights(one_thread) -> None:
    summed = models.adapt_stem(_rgb_backbone(), 1, "sum").eval()
    repeated = models.adapt_stem(_rgb_backbone(), 1, "repeat").eval()
    assert summed.conv1.weight.shape[1] == 1 and repeated.conv1.weight.shape[1] == 3
    assert models.stem_channels(repeated) == 3 and models.stem_channels(summed) == 1
    grey = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(summed(grey), repeated(grey), rtol=1e-5, atol=1e-5)


def test_repeat_stem_survives_the_encoder_file(tmp_path: Path, one_thread) -> None:
    net = models.adapt_stem(_rgb_backbone(), 1, "repeat")
    path = tmp_path / "encoder.pt"
    models.save_encoder(net, path, "resnet18", {"method": "test"})
    info = models.read_sidecar(path)
    assert info["in_channels"] == 1 and info["stem"] == "repeat" and info["stem_channels"] == 3
    state = torch.load(path, weights_only=True)
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    loaded, _ = models.load_encoder(path)
    grey = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(grey), net.eval()(grey))


def test_stem_refusals() -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        models.adapt_stem(_rgb_backbone(), 2, "repeat")
    with pytest.raises(ValueError, match="folds to 1 input channel"):
        models.adapt_stem(_rgb_backbone(), 2, "sum")
    with pytest.raises(KeyError, match="unknown stem policy"):
        models.adapt_stem(_rgb_backbone(), 1, "average")
    same = _rgb_backbone()
    assert models.adapt_stem(same, 3, "sum").conv1.in_channels == 3
    with pytest.raises(ValueError, match="stem takes 1 channels, got 3"):
        models.adapt_stem(_rgb_backbone(), 1, "repeat")(torch.rand(1, 3, 32, 32))


def test_backbone_registry_builds_each_without_a_classifier() -> None:
    for name in models.BACKBONES:
        net = models.build_backbone(name, 1)
        assert isinstance(net.fc, torch.nn.Identity) and net.conv1.in_channels == 1
        assert models.feature_dim(net) == {"resnet_small": 256, "resnet18": 512}.get(name, 2048)
    with pytest.raises(UnknownNameError, match="unknown backbone 'resnet51'; did you mean"):
        models.build_backbone("resnet51", 1)
    with pytest.raises(UnknownNameError, match="did you mean 'repeat'"):
        models.adapt_stem(_rgb_backbone(), 3, "repaet")  # checked even when nothing changes
