"""The one pre-training loop shared by every self-supervised method.

Methods differ in their heads and losses (:mod:`medssl.pretraining.methods`); everything
else that decides whether two methods are compared fairly lives here once:
optimiser, learning-rate schedule, precision, data order, checkpointing and
resumption. A job killed by the cluster and rerun resumes from its last
checkpoint and, on CPU, ends with the same weights bit for bit as an
uninterrupted run, because

* the data order, the augmentation streams and torch's global generator
  (masks, shuffles) of an epoch are derived from (seed, epoch) alone, not
  from generators that ran during earlier epochs;
* model, optimiser and scheduler state and the global RNG states are saved
  together, atomically, after whole epochs.

Under DDP (one process per GPU, :mod:`medssl.pretraining.distributed`) ``batch_size`` is
the global batch: every rank takes its share of each batch of the same
(seed, epoch) permutation, so the ranks' batches at a step make up the
batch one process would train on; rank 0 alone writes the checkpoint and
the history.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from medssl.pretraining import distributed
from medssl.pretraining import optimizers
from medssl.pretraining import syncbn
from medssl.pretraining.augment import seed_worker
from medssl.core.faults import fault_point
from medssl.core.files import atomic_path, write_csv
from medssl.core.registry import look_up
from medssl.pretraining.methods.base import Method

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.csv"
HISTORY_COLUMNS = [
    "epoch",
    "loss",
    "lr",
    "weight_decay",
    "images_per_s",
    "seconds",
    "data_wait_fraction",
]

TRAINER_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "batch_size": 256,
    "lr": 1e-3,
    "lr_scaling": "linear",
    "optimizer": "adamw",
    "momentum": 0.9,
    "weight_decay": 1e-6,
    "weight_decay_end": None,
    "warmup_epochs": 10,
    "final_lr_fraction": 0.0,
    "grad_clip": None,
    "checkpoint_every": 10,
    "precision": "auto",
}
"""Values for keys that neither the ``pretrain`` settings nor the method's recipe set."""

PRECISIONS = ("auto", "fp32", "bf16")
"""``auto``: bf16 autocast and channels_last on CUDA, plain fp32 elsewhere."""

LR_SCALINGS = ("linear", "none")
"""``linear``: the peak rate is ``lr * batch_size / 256`` (Goyal et al.); ``none``: ``lr``."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; training stopped, nothing exported."""


def train_settings(
    settings: Mapping[str, Any], recipe: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Trainer keys from ``settings``, else the method's ``recipe``, else the defaults.

    A key present in ``settings`` wins even when its value is null (e.g.
    ``grad_clip: null`` switches off a recipe's clipping).
    """
    recipe = recipe or {}
    for key in sorted(set(recipe) - set(TRAINER_DEFAULTS)):
        look_up("trainer key in a method's recipe", key, TRAINER_DEFAULTS)
    resolved = {
        key: settings[key] if key in settings else recipe.get(key, default)
        for key, default in TRAINER_DEFAULTS.items()
    }
    look_up("lr_scaling", resolved["lr_scaling"], LR_SCALINGS)
    look_up("precision", resolved["precision"], PRECISIONS)
    if not 0.0 <= float(resolved["final_lr_fraction"]) <= 1.0:
        raise ValueError(
            f"final_lr_fraction must be in [0, 1], got {resolved['final_lr_fraction']}"
        )
    if int(resolved["epochs"]) < 1 or int(resolved["batch_size"]) < 1:
        raise ValueError("epochs and batch_size must be at least 1")
    if int(resolved["checkpoint_every"]) < 1:
        raise ValueError("checkpoint_every must be at least 1")
    return resolved


def scaled_lr(settings: Mapping[str, Any]) -> float:
    """Peak learning rate: ``lr * batch_size / 256`` (Goyal et al.) or ``lr`` as given."""
    base = float(settings["lr"])
    if settings["lr_scaling"] == "linear":
        return base * int(settings["batch_size"]) / 256
    return base


def build_optimizer(method: Method, settings: Mapping[str, Any]) -> Optimizer:
    """The optimiser named by ``settings['optimizer']`` (:data:`medssl.pretraining.optimizers.OPTIMIZERS`)."""
    return optimizers.build(
        settings["optimizer"], method.optimizer_groups(), scaled_lr(settings), settings
    )


def warmup_cosine(warmup_steps: int, total_steps: int, final_fraction: float = 0.0) -> Any:
    """LR multiplier per step: linear warm-up to 1, then cosine decay to ``final_fraction``.

    Per step rather than per epoch so short runs with few epochs still get a
    smooth schedule. ``final_fraction`` is where the cosine ends (0 for
    SimCLR, MoCo and BYOL; 0.001 for SparK, SwAV and Barlow Twins).
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def weight_decay_at(step: int, total_steps: int, start: float, end: float | None) -> float:
    """Weight decay at 0-based ``step``: constant ``start``, or cosine from ``start`` to ``end``.

    SparK raises its decay from 0.04 to 0.2 this way over the whole run
    (no warm-up), reaching ``end`` at the last step.
    """
    if end is None:
        return start
    progress = min(1.0, step / max(1, total_steps - 1))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_weight_decay(optimizer: Optimizer, value: float) -> None:
    """Set the decay of every decaying group (those not flagged ``lars_exclude``)."""
    for group in optimizer.param_groups:
        if not group.get("lars_exclude", False):
            group["weight_decay"] = value


def epoch_seed(seed: int, epoch: int, stream: int, rank: int | None = None) -> int:
    """A well-mixed 63-bit seed for one (seed, epoch, stream[, rank]) tuple.

    Streams: 0 = data order and worker base seeds, 1 = in-process augmentation,
    2 = torch's global generator (SparK's masks, MoCo's shuffles). ``rank``
    (only under DDP) gives each process its own augmentation and mask stream.
    """
    entropy = [seed, epoch, stream] + ([] if rank is None else [rank])
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> 1)


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain types, loadable with ``weights_only=True``."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a killed job leaves the previous one intact."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary code from pickles)."""
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class TrainResult:
    """What a finished run reports: per-epoch history and the final epoch's loss."""

    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0

    @property
    def final_loss(self) -> float:
        return float(self.history[-1]["loss"]) if self.history else float("nan")


def _fingerprint_text(fingerprint: Mapping[str, Any] | None) -> str:
    return json.dumps(fingerprint or {}, sort_keys=True, default=str)


def epoch_order(
    n: int, global_batch: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[int]:
    """This rank's sample indices for one epoch, in order.

    One permutation from (seed, epoch), cut to whole global batches; rank
    ``r`` takes the ``r``-th contiguous share of every global batch. Unlike
    ``DistributedSampler``'s interleaving, concatenating the ranks' batches
    in rank order (what :func:`medssl.pretraining.distributed.gather` does) rebuilds the
    single-process batch in its order, so queues (MoCo, SwAV) fill
    identically whatever the number of ranks.
    """
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, 0))
    order = torch.randperm(n, generator=generator)
    steps = n // global_batch
    shares = order[: steps * global_batch].view(steps, world, global_batch // world)
    return shares[:, rank].reshape(-1).tolist()


def _epoch_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    num_workers: int,
    pin: bool,
    rank: int = 0,
    world: int = 1,
) -> tuple[DataLoader, torch.Generator]:
    """The DataLoader of one epoch, its order and augmentation seeded from (seed, epoch).

    ``batch_size`` is the global batch; each of ``world`` ranks loads its
    share. Rebuilt every epoch (workers are not persistent) so that a
    resumed run starts each epoch from exactly the state an uninterrupted
    run had.
    """
    order = epoch_order(len(dataset), batch_size, seed, epoch, rank, world)
    rank_key = rank if world > 1 else None
    # Worker base seeds come from this generator; one process keeps the
    # stream it always had (the order generator after its permutation).
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, 0, rank_key))
    if world == 1:
        torch.randperm(len(dataset), generator=generator)
    if num_workers == 0 and hasattr(dataset, "reseed"):
        dataset.reseed(epoch_seed(seed, epoch, 1, rank_key))
    loader = DataLoader(
        dataset,
        batch_size=batch_size // world,
        sampler=order,
        drop_last=True,
        num_workers=num_workers,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=generator,
        pin_memory=pin,
    )
    return loader, generator


