"""BYOL: the regression loss and the cosine schedule of the target's momentum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssl.pretraining.methods.byol import byol_regression, target_momentum
from tests.pretraining.methods.small_methods import make

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / math.sqrt(float(np.dot(vector, vector)))


def test_byol_regression_is_two_minus_two_cosine() -> None:
    generator = torch.Generator().manual_seed(2)
    p, z = torch.randn(5, 6, generator=generator), torch.randn(5, 6, generator=generator)
    expected = np.mean(
        [
            2 - 2 * float(np.dot(unit(a.astype(np.float64)), unit(b.astype(np.float64))))
            for a, b in zip(p.numpy(), z.numpy(), strict=True)
        ]
    )
    assert byol_regression(p, z).item() == pytest.approx(expected, rel=1e-5)
    assert byol_regression(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_regression(p, -p).item() == pytest.approx(4.0, rel=1e-6)


def test_byol_momentum_follows_the_cosine_schedule() -> None:
    assert target_momentum(0.996, 0, 100) == pytest.approx(0.996)
    assert target_momentum(0.996, 50, 100) == pytest.approx(0.998)
    assert target_momentum(0.996, 100, 100) == pytest.approx(1.0)
    method = make("byol")
    with torch.no_grad():
        for p in method.online().parameters():
            p.add_(1.0)
    target_before = [p.clone() for p in method.target.parameters()]
    method.on_step_end(26, 101)  # 0-based step 25 of 101: cos(pi / 4)
    rate = 1 - (1 - 0.996) * (np.cos(np.pi * 25 / 101) + 1) / 2
    for new, old, src in zip(
        method.target.parameters(), target_before, method.online().parameters(), strict=True
    ):
        torch.testing.assert_close(new, old * rate + src * (1 - rate), rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for p in method.target.parameters())


def test_float32_under_autocast() -> None:
    """Inside a bfloat16 autocast region the loss still equals the float32 value."""
    p, z = torch.randn(8, 16), torch.randn(8, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = byol_regression(p, z)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(byol_regression(p, z).item(), rel=1e-6)
