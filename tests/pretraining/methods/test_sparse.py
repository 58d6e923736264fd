"""methods.sparse: sparse emulation on a dense ResNet and BatchNorm over visible positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medssl.pretraining.methods.spark import stage_features
from medssl.pretraining.methods.sparse import SPARSE_HOOKED, MaskState, sparsify
from tests.pretraining.methods.small_methods import spark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backbone", ["resnet_small", "resnet18", "resnet50"])
def test_masked_positions_are_zero_after_every_layer(backbone: str) -> None:
    """Conv, pooling and BatchNorm outputs are exactly 0 where hidden, not all 0 elsewhere."""
    method = spark(backbone)
    outputs: list[tuple[str, torch.Tensor]] = []
    for name, module in method.backbone.named_modules():
        if isinstance(module, (*SPARSE_HOOKED, nn.BatchNorm2d)):
            module.register_forward_hook(lambda m, i, o, name=name: outputs.append((name, o)))
    active = torch.tensor([[True, False], [False, True], [False, False], [True, True]])
    active = active.view(2, 1, 2, 2)
    images = torch.rand(2, 1, 64, 64) + 0.5
    with torch.no_grad(), method.mask_state.masking(active):
        stage_features(method.backbone, images)
    assert len(outputs) >= 20
    for name, output in outputs:
        factor = output.shape[-1] // 2
        visible = active.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
        visible = visible.expand_as(output)
        assert torch.count_nonzero(output[~visible]) == 0, name
        assert torch.count_nonzero(output[visible]) > 0, name
    assert method.mask_state.active is None


def test_sparse_batch_norm_statistics_use_visible_positions_only() -> None:
    """Batch and running statistics equal a numpy computation over the visible positions."""
    generator = torch.Generator().manual_seed(1)
    norm = nn.BatchNorm2d(3, momentum=0.1)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
    keys = sorted(norm.state_dict())
    state = MaskState()
    sparsify(nn.Sequential(norm), state)
    assert sorted(norm.state_dict()) == keys
    x = torch.randn(2, 3, 4, 4, generator=generator) * 3 + 5
    active = torch.tensor([[True, False], [False, False], [False, True], [True, True]])
    active = active.view(2, 1, 2, 2)
    with state.masking(active):
        out = norm(x).detach().numpy()

    pixels = active.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, 0].numpy()
    values = x.permute(0, 2, 3, 1).numpy()[pixels]  # (visible, C)
    mean = values.mean(axis=0)
    expected = (values - mean) / np.sqrt(values.var(axis=0) + norm.eps)
    expected = expected * norm.weight.detach().numpy() + norm.bias.detach().numpy()
    np.testing.assert_allclose(out.transpose(0, 2, 3, 1)[pixels], expected, rtol=1e-5, atol=1e-5)
    assert np.all(out.transpose(0, 2, 3, 1)[~pixels] == 0)
    np.testing.assert_allclose(norm.running_mean.numpy(), 0.1 * mean, rtol=1e-5)
    unbiased = values.var(axis=0, ddof=1)
    np.testing.assert_allclose(norm.running_var.numpy(), 0.9 + 0.1 * unbiased, rtol=1e-5)
    assert int(norm.num_batches_tracked) == 1

    # Without a mask the layer is the dense BatchNorm2d again.
    dense = nn.BatchNorm2d(3)
    dense.load_state_dict(norm.state_dict())
    norm.eval(), dense.eval()
    torch.testing.assert_close(norm(x), dense(x), rtol=0, atol=0)
