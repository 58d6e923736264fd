"""BYOL: the regression loss, the cosine schedule of the target's momentum and its preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssl.pretraining.loop import StepPlan, plan_steps
from medssl.pretraining.methods.byol import (
    BYOL,
    byol_regression,
    initial_weight_share,
    preset_momentum,
    target_momentum,
)
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


def run(epochs: int, batch: int, n_samples: int) -> StepPlan:
    return plan_steps({"epochs": epochs, "batch_size": batch, "warmup_epochs": 0}, n_samples)


def fitted(plan: StepPlan, **settings: object) -> dict:
    return BYOL.fit_to_run(BYOL.resolve_settings(settings), plan)


@pytest.mark.parametrize(
    ("epochs", "momentum"), [(4, 0.97), (40, 0.97), (41, 0.99), (300, 0.99), (301, 0.996)]
)
def test_base_momentum_is_the_official_preset_for_the_run(epochs: int, momentum: float) -> None:
    """deepmind byol's presets: 0.97 up to 40 epochs, 0.99 up to 300, 0.996 beyond."""
    assert preset_momentum(epochs) == momentum
    assert fitted(run(epochs, 8, 32))["base_momentum"] == momentum


def test_a_set_base_momentum_is_kept_and_a_method_built_without_a_run_takes_0_996() -> None:
    assert fitted(run(4, 8, 32), base_momentum=0.9)["base_momentum"] == 0.9
    assert make("byol").settings["base_momentum"] == 0.996


def test_initial_weight_share_is_the_product_of_the_step_rates() -> None:
    rates = [target_momentum(0.99, k, 3) for k in range(3)]
    assert initial_weight_share(0.99, 3) == pytest.approx(math.prod(rates))
    assert initial_weight_share(0.0, 3) == pytest.approx(0.0, abs=1e-12)


def test_warning_when_the_target_hardly_moves() -> None:
    """100 steps at 0.996 keep ~82 % of the initial target; 2,000 steps at 0.97 keep none."""
    short = run(4, 8, 200)  # 4 epochs of 25 steps
    (message,) = BYOL.schedule_warnings({"base_momentum": 0.996}, short)
    assert "byol.base_momentum 0.996 over 100 steps leaves 82 %" in message
    assert BYOL.schedule_warnings({"base_momentum": 0.97}, run(4, 8, 4000)) == []
