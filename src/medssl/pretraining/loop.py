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

from medssl.core.faults import fault_point
from medssl.core.files import atomic_path, write_csv
from medssl.core.registry import look_up
from medssl.pretraining import distributed, optimizers, syncbn
from medssl.pretraining.augment import seed_worker
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
    "epochs": 5,
    "batch_size": 64,
    "lr": 1e-3,
    "lr_scaling": "linear",
    "optimizer": "adamw",
    "momentum": 0.9,
    "weight_decay": 1e-6,
    "weight_decay_end": None,
    "warmup_epochs": 10,
    "final_lr_fraction": 0.0,
    "grad_clip": None,
    "checkpoint_every": 1,
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
    """The optimiser named by ``settings['optimizer']``.

    The names are those of :data:`medssl.pretraining.optimizers.OPTIMIZERS`.
    """
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


def _write_history(directory: Path, history: list[dict[str, float]]) -> None:
    if distributed.rank() == 0:
        write_csv(directory / HISTORY_NAME, pd.DataFrame(history, columns=HISTORY_COLUMNS))


def _precision(config: Mapping[str, Any], device: torch.device) -> bool:
    """True for bf16 autocast plus channels_last, False for plain fp32."""
    precision = config["precision"]
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _wrap(method: Method, device: torch.device) -> torch.nn.Module:
    """``method`` itself in one process; under DDP with global BatchNorm statistics first."""
    if not distributed.active():
        return method
    if method.sync_batch_norm:
        syncbn.synchronize(method)
    # Buffers are kept equal across ranks by the methods themselves (global
    # BatchNorm statistics, queues filled from every rank's keys), so DDP need
    # not copy rank 0's to all ranks before every forward.
    with warnings.catch_warnings():
        # torch 2.9+ suggests forward_sync_buffers, which still syncs at init
        # and is not in older releases; broadcast_buffers=False is what is meant.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)
        return DistributedDataParallel(
            method,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=method.ddp_find_unused_parameters,
        )


@dataclass(frozen=True)
class StepPlan:
    """How many optimiser steps a run takes: the schedule's and the checkpoints' clock."""

    epochs: int
    batch_size: int
    """The global batch, over every DDP rank."""
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(config: Mapping[str, Any], n_samples: int, world: int = 1) -> StepPlan:
    """The :class:`StepPlan` of resolved trainer ``config`` on ``n_samples`` over ``world`` ranks.

    Incomplete batches are dropped, so a pool smaller than one batch would
    train on nothing; that is refused with the settings to change.
    """
    epochs = int(config["epochs"])
    batch_size = int(config["batch_size"])
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} processes")
    steps_per_epoch = n_samples // batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"{n_samples} pre-training samples are fewer than batch_size {batch_size}; "
            "lower pretrain.batch_size or raise max_samples"
        )
    return StepPlan(
        epochs=epochs,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=epochs * steps_per_epoch,
        warmup_steps=round(float(config["warmup_epochs"]) * steps_per_epoch),
    )


@dataclass
class _Run:
    """What every epoch of one :func:`train` call shares, set up once by :func:`_set_up`."""

    method: Method
    model: torch.nn.Module
    """``method``, or its DDP wrapper: what the forward pass goes through."""
    optimizer: Optimizer
    scheduler: LambdaLR
    config: dict[str, Any]
    plan: StepPlan
    dataset: Dataset
    device: torch.device
    bf16: bool
    seed: int
    num_workers: int
    rank: int
    world: int
    checkpoint_path: Path
    fingerprint_text: str
    result: TrainResult

    @property
    def rank_key(self) -> int | None:
        """The rank in the seeds of per-rank streams; None in one process (its streams stay)."""
        return self.rank if self.world > 1 else None

    @property
    def check_every(self) -> int:
        """Steps between NaN checks.

        A check reads the loss back from the device; on CUDA it runs every few
        steps instead of every step so the GPU is not stalled each iteration.
        """
        return 25 if self.device.type == "cuda" else 1


def _set_up(
    method: Method,
    dataset: Dataset,
    config: dict[str, Any],
    checkpoint_path: Path,
    device: torch.device,
    seed: int,
    num_workers: int,
    fingerprint: Mapping[str, Any] | None,
) -> _Run:
    """Place the method, build optimiser and schedule, and resume from a matching checkpoint."""
    world, rank = distributed.world_size(), distributed.rank()
    plan = plan_steps(config, len(dataset), world)
    bf16 = _precision(config, device)
    method.to(device)
    if bf16:
        method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, config)
    scheduler = LambdaLR(
        optimizer,
        warmup_cosine(plan.warmup_steps, plan.total_steps, float(config["final_lr_fraction"])),
    )
    fingerprint_text = _fingerprint_text(fingerprint)
    result = _resume(checkpoint_path, fingerprint_text, method, optimizer, scheduler, plan.epochs)
    return _Run(
        method=method,
        model=_wrap(method, device),
        optimizer=optimizer,
        scheduler=scheduler,
        config=config,
        plan=plan,
        dataset=dataset,
        device=device,
        bf16=bf16,
        seed=seed,
        num_workers=num_workers,
        rank=rank,
        world=world,
        checkpoint_path=checkpoint_path,
        fingerprint_text=fingerprint_text,
        result=result,
    )


def _resume(
    checkpoint_path: Path,
    fingerprint_text: str,
    method: Method,
    optimizer: Optimizer,
    scheduler: LambdaLR,
    epochs: int,
) -> TrainResult:
    """An empty result, or one resumed from the checkpoint of the same run.

    Resuming restores the model, optimiser, scheduler and global RNG states;
    a checkpoint of another fingerprint is ignored with a warning.
    """
    result = TrainResult()
    if not checkpoint_path.exists():
        return result
    state = load_checkpoint(checkpoint_path)
    if state.get("fingerprint") != fingerprint_text:
        log.warning(
            "%s was written by a different configuration; starting from scratch", checkpoint_path
        )
        return result
    method.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    result.resumed_from = int(state["epoch"])
    result.history = [dict(row) for row in state["history"]]
    log.info("resuming from %s at epoch %d of %d", checkpoint_path, result.resumed_from, epochs)
    return result


def _optimisation_step(run: _Run, views: list[torch.Tensor], global_step: int) -> torch.Tensor:
    """One forward, backward and optimiser step on one batch of views; returns the loss."""
    views = [view.to(run.device, non_blocking=True) for view in views]
    if run.bf16:
        views = [view.contiguous(memory_format=torch.channels_last) for view in views]
    config, plan = run.config, run.plan
    set_weight_decay(
        run.optimizer,
        weight_decay_at(
            global_step, plan.total_steps, float(config["weight_decay"]), config["weight_decay_end"]
        ),
    )
    autocast = (
        torch.autocast(device_type=run.device.type, dtype=torch.bfloat16)
        if run.bf16
        else nullcontext()
    )
    with autocast:
        loss = run.model(views)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config["grad_clip"] is not None:
        torch.nn.utils.clip_grad_norm_(run.method.parameters(), float(config["grad_clip"]))
    run.optimizer.step()
    run.scheduler.step()
    run.method.on_step_end(global_step + 1, plan.total_steps)
    fault_point("pretrain.step")
    return loss


def _train_epoch(run: _Run, epoch: int) -> torch.Generator:
    """Train 0-based ``epoch`` and append its history row; returns its order generator."""
    run.method.train()
    run.method.on_epoch_start(epoch)
    torch.manual_seed(epoch_seed(run.seed, epoch, 2, run.rank_key))
    loader, generator = _epoch_loader(
        run.dataset,
        run.plan.batch_size,
        run.seed,
        epoch,
        run.num_workers,
        run.device.type == "cuda",
        run.rank,
        run.world,
    )
    steps_per_epoch = run.plan.steps_per_epoch
    started = time.perf_counter()
    waited = 0.0
    loss_sum = torch.zeros((), device=run.device)
    steps = 0
    batches = iter(loader)
    for step_in_epoch in range(steps_per_epoch):
        # Host time blocked on the loader; on a GPU an upper bound on the
        # time the device starves, since the host usually runs ahead.
        before = time.perf_counter()
        views = next(batches)
        waited += time.perf_counter() - before
        loss = _optimisation_step(run, views, epoch * steps_per_epoch + step_in_epoch)
        loss_sum += loss.detach().float()
        steps += 1
        if steps % run.check_every == 0 or steps == steps_per_epoch:
            _check_finite(distributed.mean(loss_sum), epoch + 1, steps, run.checkpoint_path)
    seconds = time.perf_counter() - started
    row = _history_row(run, epoch, loss_sum, waited / seconds, steps, seconds)
    run.result.history.append(row)
    log.info(
        "epoch %d/%d loss %.4f lr %.3g %.1f images/s, %.1f %% waiting for data",
        epoch + 1,
        run.plan.epochs,
        row["loss"],
        row["lr"],
        row["images_per_s"],
        100 * row["data_wait_fraction"],
    )
    return generator


def _history_row(
    run: _Run,
    epoch: int,
    loss_sum: torch.Tensor,
    wait_fraction: float,
    steps: int,
    seconds: float,
) -> dict[str, float]:
    """The ``history.csv`` row of 0-based ``epoch``; loss and data wait are means over ranks."""
    decaying = [g for g in run.optimizer.param_groups if not g.get("lars_exclude", False)]
    return {
        "epoch": epoch + 1,
        "loss": float(distributed.mean(loss_sum)) / steps,
        "lr": float(run.optimizer.param_groups[0]["lr"]),
        "weight_decay": float(decaying[0]["weight_decay"]) if decaying else 0.0,
        "images_per_s": steps * run.plan.batch_size / seconds,
        "seconds": seconds,
        "data_wait_fraction": float(
            distributed.mean(torch.tensor(wait_fraction, device=run.device))
        ),
    }


def _checkpoint_if_due(run: _Run, epochs_done: int, generator: torch.Generator) -> None:
    """On rank 0, every ``checkpoint_every`` epochs and after the last, save the run's state."""
    if run.rank != 0:
        return
    if epochs_done % int(run.config["checkpoint_every"]) and epochs_done != run.plan.epochs:
        return
    save_checkpoint(
        run.checkpoint_path,
        {
            "model": run.method.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "epoch": epochs_done,
            "history": run.result.history,
            # "data" is a record only: each epoch's order generator is
            # reseeded from (seed, epoch), which is what makes resuming exact.
            "rng": {**rng_state(), "data": generator.get_state()},
            "fingerprint": run.fingerprint_text,
        },
    )
    fault_point("pretrain.checkpoint_saved")


def train(
    method: Method,
    dataset: Dataset,
    settings: Mapping[str, Any],
    *,
    checkpoint_dir: str | Path,
    seed: int,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    fingerprint: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``method`` on ``dataset`` (items: lists of views), resuming if a checkpoint exists.

    ``settings`` are the trainer keys over the method's ``optim_recipe``
    (:func:`train_settings`). ``fingerprint`` describes the run (method,
    settings, seed, data); a checkpoint written under a different fingerprint
    is not resumed from, because continuing another configuration's weights
    would silently mix two experiments. Raises :class:`NonFiniteLossError`
    when the loss is NaN/inf. Under DDP every rank calls this with the same
    arguments; the process group must be initialised (:func:`medssl.pretraining.distributed.init`).
    """
    config = train_settings(settings, method.optim_recipe)
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    run = _set_up(
        method,
        dataset,
        config,
        directory / CHECKPOINT_NAME,
        torch.device(device),
        seed,
        num_workers,
        fingerprint,
    )
    for epoch in range(run.result.resumed_from, run.plan.epochs):
        generator = _train_epoch(run, epoch)
        _checkpoint_if_due(run, epoch + 1, generator)
        _write_history(directory, run.result.history)
    if run.result.resumed_from == run.plan.epochs:
        _write_history(directory, run.result.history)
    distributed.barrier()
    return run.result


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int, checkpoint: Path) -> None:
    """Raise :class:`NonFiniteLossError` if any loss summed so far is NaN or infinite."""
    if not bool(torch.isfinite(loss_sum)):
        raise NonFiniteLossError(
            f"pre-training loss became {float(loss_sum)} at epoch {epoch}, step {step} "
            f"(checked every few steps on GPU); the last good checkpoint, if any, is "
            f"{checkpoint}. Lower pretrain.lr, set pretrain.grad_clip, or check the data."
        )
