"""Barlow Twins: the redundancy-reduction loss against explicit sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssl.pretraining.methods.barlow_twins import barlow_twins_loss


def reference_barlow(z1: np.ndarray, z2: np.ndarray, lam: float, eps: float = 1e-5) -> float:
    n, d = z1.shape

    def standardise(z: np.ndarray, j: int) -> list[float]:
        column = [float(z[b, j]) for b in range(n)]
        mean = sum(column) / n
        var = sum((x - mean) ** 2 for x in column) / n
        return [(x - mean) / math.sqrt(var + eps) for x in column]

    a = [standardise(z1, j) for j in range(d)]
    b = [standardise(z2, j) for j in range(d)]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][s] * b[j][s] for s in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lam * c**2
    return loss


@pytest.mark.parametrize("lam", [0.0051, 1.0])
def test_barlow_twins_matches_explicit_sums(lam: float) -> None:
    generator = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(7, 5, generator=generator), torch.randn(7, 5, generator=generator)
    expected = reference_barlow(z1.double().numpy(), z2.double().numpy(), lam)
    assert barlow_twins_loss(z1, z2, lam).item() == pytest.approx(expected, rel=1e-5)


def test_barlow_twins_is_near_zero_for_identical_decorrelated_views() -> None:
    """Orthogonal, standardised columns give C = I: the loss vanishes (up to BN's eps)."""
    data = torch.randn(64, 4, dtype=torch.float64)
    # QR of centred data: orthonormal columns that stay orthogonal to the ones vector.
    z = torch.linalg.qr(data - data.mean(dim=0))[0] * 8.0
    assert barlow_twins_loss(z, z, 0.0051).item() < 1e-6
    assert barlow_twins_loss(z, torch.randn(64, 4, dtype=torch.float64), 0.0051).item() > 1.0


def test_float32_under_autocast() -> None:
    """Inside a bfloat16 autocast region the loss still equals the float32 value."""
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = barlow_twins_loss(z1, z2, 0.0051)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(barlow_twins_loss(z1, z2, 0.0051).item(), rel=1e-6)
