"""SparK: sparse emulation, sparse BatchNorm, masking, loss, LAMB, training and export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pretrain import make_h5
from torch import nn
from torchvision.models import resnet18

from medssl.models import backbones as models
from medssl.pretraining.methods import build_method
from medssl.pretraining.methods.spark import SPARK_AUGMENT, masked_patch_loss, random_mask, stage_features
from medssl.pretraining.methods.sparse import SPARSE_HOOKED, MaskState, sparsify
from medssl.pretraining.optimizers import LAMB
from medssl.pretraining.recipes import main
from medssl.pretraining.loop import build_optimizer, train_settings

SMALL = {"decoder_width": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


def spark(backbone: str = "resnet_small", seed: int = 0, **settings) -> nn.Module:
    torch.manual_seed(seed)
    return build_method("spark", models.build_backbone(backbone, 1), {**SMALL, **settings})


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


@pytest.mark.parametrize(("ratio", "hidden"), [(0.6, 2), (0.01, 1), (0.99, 3)])
def test_random_mask_counts(ratio: float, hidden: int) -> None:
    """round(cells * ratio) hidden per image, clamped so that >= 1 is hidden and >= 1 visible."""
    torch.manual_seed(0)
    active = random_mask(64, 2, 2, ratio)
    assert active.shape == (64, 1, 2, 2) and active.dtype == torch.bool
    assert torch.all((~active).flatten(1).sum(1) == hidden)
    if hidden == 2:
        assert len({tuple(row.tolist()) for row in active.flatten(1)}) > 1


def test_loss_normalises_each_patch_and_averages_hidden_patches_only() -> None:
    """Against a per-patch loop in numpy (unbiased variance as in the official code)."""
    generator = torch.Generator().manual_seed(2)
    target = torch.rand(3, 2, 64, 96, generator=generator) * 4 - 1
    reconstruction = torch.randn(3, 2, 64, 96, generator=generator)
    active = torch.rand(3, 1, 2, 3, generator=generator) > 0.5
    active[0, 0, 0, 0] = False
    loss = masked_patch_loss(target, reconstruction, active, 32)

    t, r, a = target.numpy(), reconstruction.numpy(), active.numpy()
    errors = []
    for b in range(3):
        for i in range(2):
            for j in range(3):
                if a[b, 0, i, j]:
                    continue
                window = (b, slice(None), slice(32 * i, 32 * i + 32), slice(32 * j, 32 * j + 32))
                patch = t[window].astype(np.float64)
                normalised = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
                errors.append(np.mean((r[window] - normalised) ** 2))
    assert math.isclose(float(loss), float(np.mean(errors)), rel_tol=1e-5)

    # Changing the reconstruction of a visible patch leaves the loss unchanged.
    b, i, j = [int(v) for v in torch.nonzero(active[:, 0])[0]]
    changed = reconstruction.clone()
    changed[b, :, 32 * i : 32 * i + 32, 32 * j : 32 * j + 32] += 10
    assert float(masked_patch_loss(target, changed, active, 32)) == float(loss)


def test_lamb_step_matches_formula() -> None:
    """One LAMB step: bias-corrected Adam direction plus decay, scaled by ||w|| / ||r||."""
    weight = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    bias = nn.Parameter(torch.tensor([0.35, -0.2]))
    groups = [
        {"params": [weight], "lars_exclude": False},
        {"params": [bias], "weight_decay": 0.0, "lars_exclude": True},
    ]
    optimizer = LAMB(groups, lr=0.1, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.04)
    grad_w = np.array([[0.3, -0.1], [0.2, 0.4]])
    grad_b = np.array([0.5, -0.5])
    weight.grad = torch.tensor(grad_w, dtype=torch.float32)
    bias.grad = torch.tensor(grad_b, dtype=torch.float32)
    w0, b0 = weight.detach().numpy().astype(np.float64), bias.detach().numpy().astype(np.float64)
    optimizer.step()

    def adam_direction(g: np.ndarray) -> np.ndarray:
        m_hat = (0.1 * g) / (1 - 0.9)
        v_hat = (0.05 * g * g) / (1 - 0.95)
        return m_hat / (np.sqrt(v_hat) + 1e-6)

    r = adam_direction(grad_w) + 0.04 * w0
    expected_w = w0 - 0.1 * (np.linalg.norm(w0) / np.linalg.norm(r)) * r
    expected_b = b0 - 0.1 * adam_direction(grad_b)
    np.testing.assert_allclose(weight.detach().numpy(), expected_w, rtol=1e-5)
    np.testing.assert_allclose(bias.detach().numpy(), expected_b, rtol=1e-5)


def synthetic_slices(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth blob images: a bright disc per slice at a random place on a gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        cy, cx, radius = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2).astype(np.float64)
        images.append(0.5 * xx + disc + 0.05 * rng.standard_normal((size, size)))
    return torch.tensor(np.stack(images)[:, None], dtype=torch.float32)


def test_lamb_steps_reduce_the_loss_and_export_is_a_torchvision_encoder(tmp_path: Path) -> None:
    """Loss on fixed masks drops after a few LAMB steps; the export loads as a plain ResNet."""
    method = spark("resnet_small", seed=0)
    images = synthetic_slices(8)
    settings = train_settings({"optimizer": "lamb", "lr": 3e-2, "weight_decay": 0.04})
    optimizer = build_optimizer(method, {**settings, "lr_scaling": "none"})

    def fixed_mask_loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return float(method([images]))

    before = fixed_mask_loss()
    torch.manual_seed(0)
    for _ in range(12):
        loss = method([images])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = fixed_mask_loss()
    assert after < 0.97 * before, (before, after)

    out = tmp_path / "encoder.pt"
    models.save_encoder(method.encoder(), out, "resnet_small", {"method": "spark"})
    loaded, info = models.load_encoder(out)
    method.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), method.encoder()(images))


def test_exported_keys_equal_torchvision_resnet18_without_fc(tmp_path: Path) -> None:
    method = spark("resnet18")
    out = tmp_path / "encoder.pt"
    models.save_encoder(method.encoder(), out, "resnet18", {"method": "spark"})
    state = torch.load(out, weights_only=True)
    expected = {k for k in resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(state) == expected
    models.load_encoder(out)


def test_augment_overrides_and_settings() -> None:
    method = spark(augment={"crop_scale": [0.5, 1.0]})
    assert method.augment_overrides() == {**SPARK_AUGMENT, "crop_scale": [0.5, 1.0]}
    assert method.views_per_sample == 1
    with pytest.raises(ValueError, match="mask_ratio"):
        spark(mask_ratio=1.0)
    with pytest.raises(ValueError, match="divisible by 32"):
        method([torch.rand(2, 1, 48, 48)])


def test_cli_pretrains_spark_one_epoch(tmp_path: Path) -> None:
    pool = make_h5(tmp_path / "pool.h5", n=8, size=64)
    settings = {
        "backbone": "resnet_small",
        "epochs": 1,
        "batch_size": 4,
        "lr": 2e-4,
        "lr_scaling": "linear",
        "optimizer": "lamb",
        "weight_decay": 0.04,
        "warmup_epochs": 1,
        "grad_clip": 5.0,
        "augment": {},
        "spark": {"mask_ratio": 0.6, "decoder_width": 32, "augment": {}},
    }
    out = tmp_path / "init" / "spark" / "encoder.pt"
    args = ["--method", "spark", "--data", str(pool), "--settings", json.dumps(settings)]
    args += ["--out", str(out), "--checkpoint-dir", str(tmp_path / "ck"), "--device", "cpu"]
    assert main(args) == 0
    model, info = models.load_encoder(out)
    assert info["method"] == "spark" and info["epochs"] == 1
    assert math.isfinite(info["final_loss"])
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 256)
