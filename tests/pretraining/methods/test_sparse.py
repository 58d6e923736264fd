"""methods.sparse: sparse emulation on a dense ResNet and BatchNorm over visible positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from medssl.models import backbones as models
from medssl.pretraining.methods.spark import masked_patch_loss, random_mask, stage_features
from medssl.pretraining.methods.sparse import (
    SPARSE_HOOKED,
    MaskState,
    sparsify,
)
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


def _spark_pair(backbone: str) -> tuple[nn.Module, nn.Module]:
    """Two float64 SparK methods with equal weights, one per sparse implementation."""
    gather = spark(backbone, sparse_impl="gather").double()
    masked = spark(backbone, sparse_impl="dense_masked").double()
    masked.load_state_dict(gather.state_dict())
    return gather, masked


def _record_stage_outputs(method: nn.Module) -> list[torch.Tensor]:
    """Outputs of every BatchNorm and every stage of ``method``'s backbone, in call order."""
    outputs: list[torch.Tensor] = []
    for module in method.modules():
        if isinstance(module, nn.BatchNorm2d) or module in (
            method.backbone.layer1,
            method.backbone.layer2,
            method.backbone.layer3,
            method.backbone.layer4,
        ):
            module.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    return outputs


@pytest.mark.parametrize("backbone", ["resnet_small", "resnet18"])
def test_gather_and_dense_masked_agree_in_float64(backbone: str) -> None:
    """Features, BN outputs, running statistics, loss and every gradient agree to 1e-10."""
    gather, masked = _spark_pair(backbone)
    recorded = [_record_stage_outputs(gather), _record_stage_outputs(masked)]
    images = torch.rand(4, 1, 64, 64, dtype=torch.float64) + 0.25
    losses = []
    for method in (gather, masked):
        torch.manual_seed(3)  # the same masks
        loss = method([images])
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-12)
    assert len(recorded[0]) == len(recorded[1]) > 20
    for a, b in zip(*recorded, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    buffers = dict(masked.named_buffers())
    for name, value in gather.named_buffers():
        torch.testing.assert_close(value, buffers[name], rtol=0, atol=1e-12, msg=name)
    grads = {name: p.grad for name, p in masked.named_parameters()}
    for name, param in gather.named_parameters():
        assert param.grad is not None and grads[name] is not None, name
        torch.testing.assert_close(param.grad, grads[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_masked_batch_norm_equals_gather_in_train_and_eval(momentum: float | None) -> None:
    """One layer, both conventions of the running statistics, then eval mode with them."""
    generator = torch.Generator().manual_seed(2)
    layers = []
    for impl in ("gather", "dense_masked"):
        norm = nn.BatchNorm2d(3, momentum=momentum).double()
        with torch.no_grad():
            norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            norm.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
        state = MaskState(impl=impl)
        sparsify(nn.Sequential(norm), state)
        layers.append((norm, state))
    active = torch.tensor([[True, False], [False, False], [False, True], [True, True]])
    active = active.view(2, 1, 2, 2)
    for step in range(3):
        x = torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64) * 3 + step
        outs = []
        for norm, state in layers:
            with state.masking(active):
                outs.append(norm(x))
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
    (a, _), (b, _) = layers
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-12)
    outs = []
    for norm, state in layers:
        norm.eval()
        with state.masking(active):
            outs.append(norm(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)


SYNCHRONISING_OPS = {
    "aten::nonzero",
    "aten::_local_scalar_dense",
    "aten::masked_select",
    "aten::item",
}
"""aten ops whose output size or value the host must wait for on a GPU."""


class SyncRecorder(TorchDispatchMode):
    """Records every aten op that would make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func._schema.name
        if name in SYNCHRONISING_OPS:
            self.found.append(name)
        elif name in ("aten::index", "aten::index_put", "aten::index_put_"):
            indices = args[1] if len(args) > 1 else ()
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.found.append(f"{name} with a boolean mask")
        elif name == "aten::_to_copy" and (kwargs or {}).get("device") == torch.device("cpu"):
            self.found.append("aten::_to_copy to the host")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("impl", "syncs"), [("dense_masked", False), ("gather", True)])
def test_dense_masked_step_has_no_synchronising_op(impl: str, syncs: bool) -> None:
    """Forward and backward of a SparK step under an op recorder: none for dense_masked.

    The gather path is the control: its boolean indexing must be caught, so
    the recorder is known to see what it looks for. Stochastic depth is on,
    as in SparK's recipe. The mask is drawn before
    the recorded region, as on a GPU it is drawn on the host and copied over.
    """
    method = spark("resnet_small", sparse_impl=impl)
    models.set_drop_path(method.backbone, 0.05)  # SparK's recipe draws per-sample drops
    method.train()
    images = torch.rand(2, 1, 64, 64)
    active = random_mask(2, 2, 2, 0.6)
    with SyncRecorder() as recorder, method.mask_state.masking(active):
        features = stage_features(method.backbone, images * method.mask_state.at(64, 64))
        dense = method.densify(features)
        loss = masked_patch_loss(images, method.decoder(dense), active, 32)
        loss.backward()
    assert bool(recorder.found) == syncs, recorder.found
