"""TensorFlow-style padding: features equal a network written with explicit F.pad."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from medssl.core.registry import UnknownNameError
from medssl.models.backbones import adapt_stem, load_encoder, save_encoder
from medssl.models.padding import padding_sidecar, set_padding


def tf_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow's SAME amounts, computed here from the definition, per axis."""
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad takes the last axis first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def conv(layer: nn.Conv2d, x: torch.Tensor, same: bool) -> torch.Tensor:
    """``layer`` with SAME padding where asked (strided, k > 1), torchvision's otherwise."""
    k, s = layer.kernel_size[0], layer.stride[0]
    if same and s > 1 and k > 1:
        return F.conv2d(tf_same(x, k, s), layer.weight, stride=s)
    return F.conv2d(x, layer.weight, stride=s, padding=layer.padding)


def block(b: BasicBlock | Bottleneck, x: torch.Tensor, same: bool) -> torch.Tensor:
    convs = [b.conv1, b.conv2] + ([b.conv3] if isinstance(b, Bottleneck) else [])
    norms = [b.bn1, b.bn2] + ([b.bn3] if isinstance(b, Bottleneck) else [])
    out = x
    for i, (c, n) in enumerate(zip(convs, norms, strict=True)):
        out = n(conv(c, out, same))
        if i < len(convs) - 1:
            out = F.relu(out)
    shortcut = x if b.downsample is None else b.downsample[1](conv(b.downsample[0], x, same))
    return F.relu(out + shortcut)


def reference(model: ResNet, x: torch.Tensor, variant: str) -> torch.Tensor:
    """The pooled features of ``model`` padded as TensorFlow pads, layer by layer."""
    same_convs = variant == "tf_same"
    if same_convs:
        x = F.conv2d(tf_same(x, 7, 2), model.conv1.weight, stride=2)
    else:  # SimCLR's fixed_padding: 3 before and 3 after a 7x7 kernel
        x = F.conv2d(F.pad(x, [3, 3, 3, 3]), model.conv1.weight, stride=2)
    x = F.relu(model.bn1(x))
    x = F.max_pool2d(tf_same(x, 3, 2, value=float("-inf")), 3, 2)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for b in layer:
            x = block(b, x, same_convs)
    return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def nets() -> dict[str, ResNet]:
    torch.manual_seed(0)
    return {"resnet18": resnet18().eval(), "resnet50": resnet50().eval()}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("variant", ["tf_same", "tf_fixed"])
@pytest.mark.parametrize("size", [64, 61])  # odd sides: TF pads some layers as torch
def test_features_equal_explicit_tensorflow_padding(
    nets: dict[str, ResNet], arch: str, variant: str, size: int
) -> None:
    model = nets[arch]
    model.fc = nn.Identity()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(x)
        set_padding(model, variant)
        padded = model(x)
        expected = reference(model, x, variant)
        set_padding(model, "torch")
        restored = model(x)
    torch.testing.assert_close(padded, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(restored, plain)
    if size % 2 == 0:  # on even sides the windows move: not torchvision's under another name
        assert (padded - plain).abs().max() > 1e-3 * plain.abs().max()


def test_repeat_stem_keeps_the_padding_through_an_encoder_file(tmp_path: Path) -> None:
    """Saved with its variant in the sidecar, loaded back padded the same way."""
    torch.manual_seed(0)
    model = resnet18()
    model.feature_dim = 512
    model.fc = nn.Identity()
    adapt_stem(model, 1, "repeat")
    set_padding(model, "tf_same")
    out = tmp_path / "encoder.pt"
    save_encoder(model.eval(), out, "resnet18", {"method": "test"})
    loaded, info = load_encoder(out)
    assert info["padding"] == "tf_same" and padding_sidecar(loaded) == {"padding": "tf_same"}
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))
        expected = reference(model, x.repeat(1, 3, 1, 1), "tf_same")
    torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)


def test_default_padding_writes_nothing_and_unknown_is_refused() -> None:
    model = resnet18()
    assert padding_sidecar(model) == {}
    with pytest.raises(UnknownNameError, match="tf_same"):
        set_padding(model, "tf-same")
