"""MoCo v2: InfoNCE against a slow reference, momentum keys, the queue and split BatchNorm,
and the queue fitted to the run's length."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssl.pretraining.loop import StepPlan, plan_steps
from medssl.pretraining.methods.moco_v2 import MoCoV2, info_nce
from tests.pretraining.methods.small_methods import ct_slices, make


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / math.sqrt(float(np.dot(vector, vector)))


def reference_info_nce(q: np.ndarray, k: np.ndarray, queue: np.ndarray, t: float) -> float:
    total = 0.0
    for qi, ki in zip(q, k, strict=True):
        qi, ki = unit(qi.astype(np.float64)), unit(ki.astype(np.float64))
        positive = math.exp(float(np.dot(qi, ki)) / t)
        negatives = sum(math.exp(float(np.dot(qi, m)) / t) for m in queue.astype(np.float64))
        total += -math.log(positive / (positive + negatives))
    return total / len(q)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def slices() -> torch.Tensor:
    return ct_slices()


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_matches_reference(temperature: float) -> None:
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    queue = torch.nn.functional.normalize(torch.randn(11, 8, generator=generator), dim=1)
    expected = reference_info_nce(q.numpy(), k.numpy(), queue.numpy(), temperature)
    assert info_nce(q, k, queue, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_gradient_reaches_query_only() -> None:
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    info_nce(q, k, torch.nn.functional.normalize(torch.randn(9, 8), dim=1), 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None
    with pytest.raises(ValueError, match="queue"):
        info_nce(q, k, torch.randn(9, 7), 0.2)


def test_moco_momentum_and_queue(slices: torch.Tensor) -> None:
    method = make("moco_v2", queue_size=24)
    views = method.make_views({}, seed=0)(slices)
    method(views)
    keys = method._pending_keys.clone()
    key_before = [p.clone() for p in method.key_encoder.parameters()]
    with torch.no_grad():
        for p in method.query_encoder().parameters():
            p.mul_(1.5)
    method.on_step_end(1, 10)
    for new, old, src in zip(
        method.key_encoder.parameters(),
        key_before,
        method.query_encoder().parameters(),
        strict=True,
    ):
        torch.testing.assert_close(new, old * 0.999 + src * (1 - 0.999), rtol=1e-6, atol=1e-7)
    assert torch.equal(method.queue[:16], keys) and int(method.queue_pointer) == 16
    method.enqueue(keys)  # wraps around the ring: 8 at the end, 8 at the start
    assert torch.equal(method.queue[16:], keys[:8]) and torch.equal(method.queue[:8], keys[8:])
    assert int(method.queue_pointer) == 8


def test_moco_split_bn_keys_are_in_input_order(slices: torch.Tensor) -> None:
    """Shuffled, group-normalised keys come back aligned with their images."""
    method = make("moco_v2", key_bn_splits=2)
    keys = method.keys(slices)
    method.key_encoder.eval()  # eval BN: grouping no longer matters, so order must match exactly
    torch.testing.assert_close(
        method.keys(slices), torch.nn.functional.normalize(method.key_encoder(slices), dim=1)
    )
    assert keys.shape == (16, 128)


def test_float32_under_autocast() -> None:
    """Inside a bfloat16 autocast region the loss still equals the float32 value."""
    query, key = torch.randn(8, 16), torch.randn(8, 16)
    queue = torch.nn.functional.normalize(torch.randn(10, 16), dim=1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = info_nce(query, key, queue, 0.2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(info_nce(query, key, queue, 0.2).item(), rel=1e-6)


def run(epochs: int, batch: int, n_samples: int) -> StepPlan:
    return plan_steps({"epochs": epochs, "batch_size": batch, "warmup_epochs": 0}, n_samples)


def fitted(plan: StepPlan, **settings: object) -> dict:
    return MoCoV2.fit_to_run(MoCoV2.resolve_settings(settings), plan)


def test_the_default_queue_is_filled_within_the_first_epoch() -> None:
    """One epoch of keys (1,000 slices at batch 64: 15 steps, 960 keys), at most 65,536,
    always a multiple of the global batch."""
    assert fitted(run(4, 64, 1000))["queue_size"] == 960
    assert fitted(run(4, 256, 1_281_167))["queue_size"] == 65536
    assert fitted(run(4, 96, 1_281_167))["queue_size"] == 65472
    assert make("moco_v2", queue_size=None).settings["queue_size"] == 65536


def test_a_set_queue_size_is_kept_or_refused_below_one_batch() -> None:
    assert fitted(run(4, 8, 32), queue_size=24)["queue_size"] == 24
    with pytest.raises(ValueError, match="moco_v2.queue_size 4 is smaller than the global batch 8"):
        fitted(run(4, 8, 32), queue_size=4)


def test_warnings_for_a_queue_that_never_fills_and_a_key_encoder_that_hardly_moves() -> None:
    plan = run(2, 8, 32)  # 8 steps, 64 keys
    messages = MoCoV2.schedule_warnings(fitted(plan, queue_size=65536), plan)
    assert len(messages) == 2
    assert "moco_v2.queue_size 65536 never fills: the run makes 64 keys" in messages[0]
    assert "65472 random vectors" in messages[0]
    assert "moco_v2.momentum 0.999 over 8 steps leaves 99 %" in messages[1]
    assert MoCoV2.schedule_warnings(fitted(plan, momentum=0.5), plan) == []
