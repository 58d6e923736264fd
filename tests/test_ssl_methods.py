"""SwAV, MoCo v2, BYOL and Barlow Twins: learning, momentum updates, queues, multi-crop, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.models import backbones as models
from medssl.datasets import synthetic as synth
from medssl.pretraining import loop as trainer
from medssl.pretraining.augment import MultiCrop, MultiViewDataset
from medssl.pretraining.methods import build_method
from medssl.pretraining.methods.byol import target_momentum
from medssl.pretraining.methods.heads import ema_update
from medssl.pretraining.methods.losses import sinkhorn_knopp
from medssl.pretraining.loop import train

SMALL: dict[str, dict] = {
    "barlow_twins": {"proj_dims": [64, 64, 64]},
    "byol": {"hidden_dim": 64, "proj_dim": 32},
    "moco_v2": {"queue_size": 64, "temperature": 0.2},
    "swav": {
        "hidden_dim": 64,
        "n_prototypes": 8,
        "n_local_crops": 2,
        "freeze_prototypes_iters": 0,
        "epsilon": 0.05,
    },
}
"""The official heads, narrowed to CPU size; every other setting is the default."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def slices() -> torch.Tensor:
    """16 synthetic CT slices of 32x32 (HU / 1000) from the project's phantom."""
    volume = synth.make_volume(np.random.default_rng(0), 16, 32)
    return torch.from_numpy(volume.hu / 1000.0).float().unsqueeze(1)


def make(name: str, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method(
        name, models.build_backbone("resnet_small", 1), {**SMALL[name], **overrides}
    )


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_few_steps_reduce_the_loss(name: str, slices: torch.Tensor) -> None:
    """Eight AdamW steps on one batch of augmented views lower the loss on that batch.

    MoCo's queue is restored before the last evaluation: otherwise it would
    hold this very batch's keys as negatives, a different loss from the first.
    """
    method = make(name)
    views = method.make_views({}, seed=0)(slices)
    buffers = {key: value.clone() for key, value in method.named_buffers() if "queue" in key}
    optimizer = torch.optim.AdamW(method.optimizer_groups(), lr=1e-3)
    losses = []
    for step in range(1, 9):
        loss = method(views)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.on_step_end(step, 8)
    method.load_state_dict(buffers, strict=False)
    with torch.no_grad():
        final = method(views).item()
    assert all(np.isfinite(losses)) and np.isfinite(final)
    assert final < losses[0]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_exported_encoder_loads_as_torchvision_resnet(name: str, tmp_path: Path) -> None:
    method = make(name)
    path = tmp_path / "encoder.pt"
    models.save_encoder(method.encoder(), path, "resnet_small", {"method": name})
    loaded, info = models.load_encoder(path)
    assert info["method"] == name
    expected = {k: v for k, v in method.backbone.state_dict().items() if not k.startswith("fc.")}
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_ema_update_is_exact() -> None:
    """Values on a 1/8 grid and momentum 0.75 make every product exact in float32."""
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for index, (a, b) in enumerate(zip(online.parameters(), target.parameters(), strict=True)):
            a.copy_(torch.arange(a.numel()).view_as(a) / 8 + index)
            b.copy_(-torch.arange(b.numel()).view_as(b) / 4)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.75)
    for new, old, src in zip(target.parameters(), before, online.parameters(), strict=True):
        assert torch.equal(new, old * 0.75 + src.detach() * 0.25)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(target, online, 1.5)


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


def test_multicrop_views_have_global_then_local_sizes(slices: torch.Tensor) -> None:
    crops = MultiCrop({}, n_global=2, n_local=3, local_size=0.5, seed=0)(slices)
    assert [tuple(v.shape) for v in crops] == [(16, 1, 32, 32)] * 2 + [(16, 1, 16, 16)] * 3
    with pytest.raises(ValueError, match="local_size"):
        MultiCrop({}, local_size=1.5)


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


class Interrupted(RuntimeError):
    """Stands in for a job killed right after its first checkpoint."""


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("byol", {}),
        ("moco_v2", {"queue_size": 24}),
        ("swav", {"queue_length": 8, "queue_start_epoch": 1, "freeze_prototypes_iters": 3}),
    ],
)
def test_interrupted_run_resumes_to_identical_state(
    name: str,
    overrides: dict,
    slices: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Targets, queues and step counters are checkpointed: a resumed run ends bit for bit equal."""
    settings = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0}

    def run(directory: Path) -> dict[str, torch.Tensor]:
        method = make(name, **overrides)
        dataset = MultiViewDataset(slices, method.make_views({}, seed=0))
        train(method, dataset, settings, checkpoint_dir=directory, seed=0)
        return method.state_dict()

    uninterrupted = run(tmp_path / "whole")
    write_history = trainer._write_history

    def stop_after_first_epoch(directory: Path, history: list) -> None:
        write_history(directory, history)
        raise Interrupted

    monkeypatch.setattr(trainer, "_write_history", stop_after_first_epoch)
    with pytest.raises(Interrupted):
        run(tmp_path / "split")
    monkeypatch.setattr(trainer, "_write_history", write_history)
    resumed = run(tmp_path / "split")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)
