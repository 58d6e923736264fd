"""SparK: masking, the reconstruction loss, training with LAMB and a torchvision export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from medssl.models import backbones as models
from medssl.pretraining.loop import build_optimizer, train_settings
from medssl.pretraining.methods import build_method, method_class
from medssl.pretraining.methods.spark import (
    SPARK_AUGMENT,
    masked_patch_loss,
    random_mask,
)
from tests.pretraining.methods.small_methods import spark

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_sparse_impl_setting_is_checked() -> None:
    assert spark().mask_state.impl == "dense_masked"
    assert spark(sparse_impl="gather").mask_state.impl == "gather"
    with pytest.raises(KeyError, match="unknown spark.sparse_impl 'gathr'; did you mean 'gather'"):
        spark(sparse_impl="gathr")


def test_narrow_decoder_trains_and_exports_with_the_backbone_recipe(tmp_path: Path) -> None:
    """Width 128 on the small backbone, built with SparK's recipe for a random start."""
    options = models.resolve_backbone_options(
        None, method_class("spark").backbone_recipe, random_start=True
    )
    assert options == {"zero_init_residual": True, "drop_path": 0.05}
    torch.manual_seed(0)
    backbone = models.build_backbone("resnet_small", 1, **options)
    method = build_method("spark", backbone, {"decoder_width": 128})
    assert method.decoder.blocks[0][1].in_channels == 128
    assert method.decoder.head.in_channels == 4
    images = synthetic_slices(4)
    optimizer = build_optimizer(method, train_settings({"optimizer": "lamb", "batch_size": 4}))
    loss = method([images])
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item())
    out = tmp_path / "encoder.pt"
    models.save_encoder(method.encoder(), out, "resnet_small", {"method": "spark"})
    assert models.read_sidecar(out)["backbone_options"] == options
    loaded, _ = models.load_encoder(out)
    method.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), method.encoder()(images))
