"""SwAV: Sinkhorn codes and swapped prediction against loops, prototypes, multi-crop queue,
and the freeze and queue fitted to the run's length."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.pretraining.augment import MultiViewDataset
from medssl.pretraining.loop import StepPlan, plan_steps, train
from medssl.pretraining.methods.swav import SwAV, sinkhorn_knopp, swapped_prediction
from tests.pretraining.methods.small_methods import ct_slices, make


def reference_sinkhorn(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """Alternate row (prototype) and column (sample) normalisation with explicit loops."""
    n, k = scores.shape
    q = [[math.exp(float(scores[i, j]) / epsilon) for i in range(n)] for j in range(k)]
    total = sum(sum(row) for row in q)
    q = [[value / total for value in row] for row in q]
    for _ in range(iterations):
        for j in range(k):
            row_sum = sum(q[j])
            q[j] = [value / row_sum / k for value in q[j]]
        for i in range(n):
            col_sum = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / col_sum / n
    return np.array([[q[j][i] * n for j in range(k)] for i in range(n)])


def reference_swapped(scores: list[np.ndarray], codes: list[np.ndarray], t: float) -> float:
    total = 0.0
    for i, code in enumerate(codes):
        terms = []
        for v, score in enumerate(scores):
            if v == i:
                continue
            per_sample = []
            for n in range(score.shape[0]):
                logits = [float(x) / t for x in score[n]]
                log_norm = math.log(sum(math.exp(x) for x in logits))
                per_sample.append(
                    -sum(c * (x - log_norm) for c, x in zip(code[n], logits, strict=True))
                )
            terms.append(sum(per_sample) / len(per_sample))
        total += sum(terms) / len(terms)
    return total / len(codes)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def slices() -> torch.Tensor:
    return ct_slices()


@pytest.mark.parametrize("iterations", [0, 1, 3])
@pytest.mark.parametrize("shape", [(4, 3), (6, 10)])
def test_sinkhorn_matches_loops(iterations: int, shape: tuple[int, int]) -> None:
    scores = torch.rand(*shape, generator=torch.Generator().manual_seed(iterations)) * 2 - 1
    codes = sinkhorn_knopp(scores, 0.5, iterations)
    expected = reference_sinkhorn(scores.double().numpy(), 0.5, iterations)
    np.testing.assert_allclose(codes.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_sinkhorn_codes_are_equipartitioned_and_stable_at_small_epsilon() -> None:
    """After the last (column) step each sample's codes sum to 1; prototype masses approach N/K."""
    scores = torch.nn.functional.normalize(torch.randn(64, 8), dim=1)
    scores = scores @ torch.nn.functional.normalize(torch.randn(16, 8), dim=1).T
    codes = sinkhorn_knopp(scores, 0.05, 3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64))
    assert codes.sum(dim=0).std() < sinkhorn_knopp(scores, 0.05, 0).sum(dim=0).std()


def test_swapped_prediction_matches_loops() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = [torch.randn(5, 7, generator=generator) for _ in range(4)]
    codes = [sinkhorn_knopp(s, 0.05, 3) for s in scores[:2]]
    loss = swapped_prediction(scores, codes, 0.1)
    expected = reference_swapped([s.numpy() for s in scores], [c.numpy() for c in codes], 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_swapped_prediction_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="crops"):
        swapped_prediction([torch.randn(2, 3)], [torch.rand(2, 3)], 0.1)
    with pytest.raises(ValueError, match="temperature"):
        swapped_prediction([torch.randn(2, 3)] * 2, [torch.rand(2, 3)], 0.0)


def test_swav_prototypes_frozen_then_trained_and_normalised(slices: torch.Tensor) -> None:
    method = make("swav", freeze_prototypes_iters=1)
    views = method.make_views({}, seed=0)(slices)
    method(views).backward()
    assert method.prototypes.weight.grad is None
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)
    method.on_step_end(1, 10)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(8))
    method(views).backward()
    assert method.prototypes.weight.grad is not None
    assert method.prototypes.weight.grad.abs().sum() > 0


def test_swav_queue_fills_then_joins_sinkhorn(slices: torch.Tensor, tmp_path: Path) -> None:
    """Through the trainer: queue off before its epoch, then filled with global-crop embeddings."""
    method = make("swav", queue_length=16, queue_start_epoch=1)
    dataset = MultiViewDataset(slices, method.make_views({}, seed=0))
    settings = {"epochs": 3, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0}
    result = train(method, dataset, settings, checkpoint_dir=tmp_path, seed=0)
    assert len(result.history) == 3 and np.isfinite(result.final_loss)
    assert int(method.queue_filled) == 16
    assert int(method.steps_done) == 6
    torch.testing.assert_close(method.queue.norm(dim=2), torch.ones(2, 16))
    # Full queue: its scores join the batch's in Sinkhorn, then the batch enters the queue.
    scores = torch.randn(8, 8)
    embeddings = torch.nn.functional.normalize(torch.randn(8, 128), dim=1)
    queued = method.queue[1].clone()
    expected = sinkhorn_knopp(torch.cat([scores, queued @ method.prototypes.weight.T]), 0.05, 3)
    torch.testing.assert_close(method.codes(scores, embeddings, 1), expected[:8])
    assert torch.equal(method.queue[1], torch.cat([embeddings, queued[:8]]))
    with pytest.raises(ValueError, match="shorter than a batch"):
        short = make("swav", queue_length=4, queue_start_epoch=0)
        short.on_epoch_start(0)
        short(short.make_views({}, seed=0)(slices))


def test_float32_under_autocast() -> None:
    """Inside a bfloat16 autocast region the loss still equals the float32 value."""
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = swapped_prediction([z1, z2], [sinkhorn_knopp(z1, 0.05, 3)], 0.1)
    assert loss.dtype == torch.float32
    expected = swapped_prediction([z1, z2], [sinkhorn_knopp(z1, 0.05, 3)], 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def run(epochs: int, batch: int, n_samples: int) -> StepPlan:
    return plan_steps({"epochs": epochs, "batch_size": batch, "warmup_epochs": 0}, n_samples)


def fitted(plan: StepPlan, **settings: object) -> dict:
    return SwAV.fit_to_run(SwAV.resolve_settings(settings), plan)


def test_the_default_queue_is_the_official_small_batch_one_for_a_long_run() -> None:
    """3,840 embeddings from epoch 15, rounded down to a multiple of the global batch."""
    assert fitted(run(100, 256, 100_000))["queue_length"] == 3840
    assert fitted(run(100, 100, 100_000))["queue_length"] == 3800
    assert fitted(run(100, 64, 100_000))["queue_start_epoch"] == 15


def test_the_default_queue_holds_at_most_one_epoch_of_the_pool() -> None:
    """A pool of 1,000 slices at batch 64 (15 steps) gets 960 embeddings, not 3,840."""
    assert fitted(run(100, 64, 1000))["queue_length"] == 960


def test_no_default_queue_when_the_run_is_too_short(caplog: pytest.LogCaptureFixture) -> None:
    """A run ending by epoch 15 or before the queue is full gets no queue; the log says so."""
    with caplog.at_level("INFO", logger="medssl.pretraining.methods.swav"):
        assert fitted(run(15, 64, 1000))["queue_length"] == 0
    assert "the run's 15 epochs end before queue_start_epoch 15" in caplog.text
    caplog.clear()
    # 16 epochs of one step: the queue of 64 (one epoch) starts at step 16, the last one,
    # and would be full only after it.
    with caplog.at_level("INFO", logger="medssl.pretraining.methods.swav"):
        assert fitted(run(16, 64, 64))["queue_length"] == 0
    assert "full only after the run's last step" in caplog.text
    assert fitted(run(17, 64, 64))["queue_length"] == 64
    assert fitted(run(16, 64, 64), queue_start_epoch=14)["queue_length"] == 64


def test_a_set_queue_length_is_kept_or_refused_when_shorter_than_the_batch() -> None:
    assert fitted(run(2, 8, 32), queue_length=16)["queue_length"] == 16
    assert fitted(run(2, 8, 32), queue_length=0)["queue_length"] == 0
    with pytest.raises(ValueError, match="swav.queue_length 4 is shorter than the global batch 8"):
        fitted(run(2, 8, 32), queue_length=4)


def test_prototypes_frozen_for_the_first_epoch_by_default(
    slices: torch.Tensor, tmp_path: Path
) -> None:
    """Through the trainer: epoch 1 leaves the prototypes alone, epoch 2 trains them."""
    method = make("swav", freeze_prototypes_iters=None)
    before = method.prototypes.weight.detach().clone()
    dataset = MultiViewDataset(slices, method.make_views({}, seed=0))
    settings = {
        "epochs": 1,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 1e-2,
        "lr_scaling": "none",
        "warmup_epochs": 0,
    }
    train(method, dataset, settings, checkpoint_dir=tmp_path / "one", seed=0)
    # Re-normalising unit vectors after each step moves them by rounding only.
    assert int(method.steps_done) == 2
    torch.testing.assert_close(method.prototypes.weight.detach(), before, rtol=0, atol=1e-6)
    method = make("swav", freeze_prototypes_iters=None)
    train(method, dataset, {**settings, "epochs": 2}, checkpoint_dir=tmp_path / "two", seed=0)
    assert (method.prototypes.weight.detach() - before).abs().max() > 1e-4
    method.on_epoch_start(0)
    assert method.prototypes_frozen()
    method.on_epoch_start(1)
    assert not method.prototypes_frozen()


def test_warning_when_the_prototypes_are_frozen_for_the_whole_run() -> None:
    settings = fitted(run(1, 8, 32))
    (message,) = SwAV.schedule_warnings(settings, run(1, 8, 32))
    assert "swav.freeze_prototypes_epochs 1 freezes the prototypes for 4 steps" in message
    assert "whole run of 4 steps" in message
    assert SwAV.schedule_warnings(settings, run(2, 8, 32)) == []
    by_steps = fitted(run(2, 8, 32), freeze_prototypes_iters=313)
    (message,) = SwAV.schedule_warnings(by_steps, run(2, 8, 32))
    assert "swav.freeze_prototypes_iters 313 freezes the prototypes for 313 steps" in message


def test_warning_when_a_set_queue_never_starts_or_never_fills() -> None:
    plan = run(4, 8, 32)  # 4 epochs of 4 steps
    never_starts = fitted(plan, queue_length=16, freeze_prototypes_epochs=0)
    (message,) = SwAV.schedule_warnings(never_starts, plan)
    assert "swav.queue_length 16 never starts" in message and "15" in message
    # From epoch 3, 4 steps are left; a queue of 32 takes 4 steps to fill.
    never_full = fitted(plan, queue_length=32, queue_start_epoch=3, freeze_prototypes_epochs=0)
    (message,) = SwAV.schedule_warnings(never_full, plan)
    assert "swav.queue_length 32 is never full: it takes 4 steps of batch 8" in message
    used = fitted(plan, queue_length=24, queue_start_epoch=3, freeze_prototypes_epochs=0)
    assert SwAV.schedule_warnings(used, plan) == []
