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


@pytest.mark.parametrize("name", ["resnet_small", "resnet18", "resnet50"])
def test_zero_init_residual_zeroes_the_last_norm_of_every_block(name: str) -> None:
    torch.manual_seed(0)
    net = models.build_backbone(name, 1, zero_init_residual=True)
    blocks = models.residual_blocks(net)
    assert len(blocks) == {"resnet_small": 4, "resnet18": 8, "resnet50": 16}[name]
    for block in blocks:
        assert torch.count_nonzero(models.last_norm(block).weight) == 0
    assert torch.count_nonzero(net.bn1.weight) > 0  # only the blocks' last norms
    plain = models.build_backbone(name, 1)
    assert all(torch.all(models.last_norm(b).weight == 1) for b in models.residual_blocks(plain))


def test_zero_init_is_not_applied_when_continuing_from_an_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = models.build_backbone("resnet_small", 1)
    path = tmp_path / "encoder.pt"
    models.save_encoder(trained, path, "resnet_small", {})
    options = models.resolve_backbone_options(
        None, {"zero_init_residual": True, "drop_path": 0.05}, random_start=False
    )
    assert options == {"zero_init_residual": False, "drop_path": 0.0}
    loaded, _ = models.load_encoder(path)
    for block in models.residual_blocks(loaded):
        assert torch.all(models.last_norm(block).weight == 1)
    random_start = models.resolve_backbone_options(
        {"drop_path": None}, {"zero_init_residual": True, "drop_path": 0.05}, random_start=True
    )
    assert random_start == {"zero_init_residual": True, "drop_path": 0.05}
    explicit = models.resolve_backbone_options({"drop_path": 0.1}, {}, random_start=False)
    assert explicit == {"zero_init_residual": False, "drop_path": 0.1}
    with pytest.raises(UnknownNameError, match="pretrain.backbone_options key 'drop_rate'"):
        models.resolve_backbone_options({"drop_rate": 0.1}, {}, random_start=True)


def test_drop_path_rates_rise_linearly_and_only_act_in_training() -> None:
    """Rates 0 .. rate over the blocks; in training whole samples' branches drop, never in eval."""
    torch.manual_seed(0)
    net = models.build_backbone("resnet50", 1, drop_path=0.3)
    rates = [getattr(b, "drop_path", None) for b in models.residual_blocks(net)]
    assert rates[0] is None  # rate 0 for the first block: no module at all
    assert [d.p for d in rates[1:]] == pytest.approx([0.3 * i / 15 for i in range(1, 16)])
    assert all(d.mode == "row" for d in rates[1:])
    assert models.drop_path_rates(4, 0.05) == pytest.approx([0.0, 0.05 / 3, 0.1 / 3, 0.05])
    with pytest.raises(ValueError, match="drop_path must be in"):
        models.build_backbone("resnet_small", 1, drop_path=1.0)

    small = models.build_backbone("resnet_small", 1, drop_path=0.6)
    block = models.residual_blocks(small)[-1]  # rate 0.6
    branch: list[torch.Tensor] = []
    # The block adds the shortcut in place: keep a copy of the branch.
    models.last_norm(block).register_forward_hook(lambda m, i, o: branch.append(o.clone()))
    x = torch.rand(64, 1, 32, 32)
    small.train()
    with torch.no_grad():
        small(x)
    dropped = (branch[-1].flatten(1).abs().sum(1) == 0).float().mean()
    assert 0.4 < float(dropped) < 0.8  # about 60 % of the samples lose the branch
    small.eval()
    with torch.no_grad():
        first, second = small(x), small(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert torch.count_nonzero(branch[-1].flatten(1).abs().sum(1) == 0) == 0
    models.set_drop_path(small, 0.0)
    assert not any(hasattr(b, "drop_path") for b in models.residual_blocks(small))


def test_options_keep_encoder_keys_and_are_recorded(tmp_path: Path) -> None:
    """A zero-init, drop-path backbone exports torchvision keys that load into the plain one."""
    torch.manual_seed(0)
    net = models.build_backbone("resnet_small", 1, zero_init_residual=True, drop_path=0.05)
    plain = models.build_backbone("resnet_small", 1)
    assert sorted(net.state_dict()) == sorted(plain.state_dict())
    path = tmp_path / "encoder.pt"
    models.save_encoder(net, path, "resnet_small", {"method": "spark"})
    info = models.read_sidecar(path)
    assert info["backbone_options"] == {"zero_init_residual": True, "drop_path": 0.05}
    loaded, _ = models.load_encoder(path)
    assert not any(hasattr(b, "drop_path") for b in models.residual_blocks(loaded))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), net.eval()(x))
    models.save_encoder(plain, path, "resnet_small", {})
    assert "backbone_options" not in models.read_sidecar(path)
