"""The one pre-training loop shared by every self-supervised method.

Methods differ in their heads and losses (:mod:`medssl.methods`); everything
else that decides whether two methods are compared fairly lives here once:
optimiser, learning-rate schedule, precision, data order, checkpointing and
resumption. A job killed by the cluster and rerun resumes from its last
checkpoint and, on CPU, ends with the same weights bit for bit as an
uninterrupted run, because

* the data order and the augmentation streams of an epoch are derived from
  (seed, epoch) alone, not from generators that ran during earlier epochs;
* model, optimiser and scheduler state and the global RNG states are saved
  together, atomically, after whole epochs.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from medssl.augment import seed_worker
from medssl.faults import fault_point
from medssl.io import atomic_path, write_csv
from medssl.lamb import LAMB
from medssl.methods.base import Method

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.csv"
HISTORY_COLUMNS = ["epoch", "loss", "lr", "images_per_s", "seconds"]

TRAINER_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "batch_size": 256,
    "lr": 1e-3,
    "lr_scaling": "linear",
    "optimizer": "adamw",
    "momentum": 0.9,
    "weight_decay": 1e-6,
    "warmup_epochs": 10,
    "grad_clip": None,
    "checkpoint_every": 10,
}
"""Values used for keys the ``pretrain`` settings leave out."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; training stopped, nothing exported."""


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., 2017) over SGD with momentum.

    torch ships no LARS, and SimCLR/BYOL's large-batch recipes depend on it, so
    it is implemented here from the paper. For each parameter tensor ``w`` with
    gradient ``g`` not in an excluded group::

        d = g + weight_decay * w
        d = d * trust_coefficient * ||w|| / ||d||     (when both norms are > 0)
        v = momentum * v + d;  w = w - lr * v

    Groups flagged ``lars_exclude`` (biases and BatchNorm parameters, see
    :meth:`medssl.methods.base.Method.optimizer_groups`) get neither weight
    decay nor the trust ratio: their norms say nothing about a sensible step
    size, and SimCLR excludes them likewise. The trust coefficient 0.001 is
    the paper's (and SimCLR's) value.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(
                f"invalid LARS hyper-parameters lr={lr} momentum={momentum} "
                f"weight_decay={weight_decay} trust_coefficient={trust_coefficient}"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> torch.Tensor | None:
        """One LARS update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        update = update.add(param, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(param)
                    update_norm = torch.linalg.vector_norm(update)
                    ratio = group["trust_coefficient"] * param_norm / update_norm
                    usable = (param_norm > 0) & (update_norm > 0)
                    update = update * torch.where(usable, ratio, torch.ones_like(ratio))
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.detach().clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def train_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer's keys of ``settings``, with :data:`TRAINER_DEFAULTS` for missing ones."""
    resolved = {key: settings.get(key, default) for key, default in TRAINER_DEFAULTS.items()}
    if resolved["lr_scaling"] not in ("linear", "none"):
        raise ValueError(f"lr_scaling must be 'linear' or 'none', got {resolved['lr_scaling']!r}")
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
    """The optimiser named by ``settings['optimizer']`` over the method's parameter groups."""
    name = settings["optimizer"]
    lr = scaled_lr(settings)
    weight_decay = float(settings["weight_decay"])
    groups = method.optimizer_groups()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=float(settings["momentum"]), weight_decay=weight_decay
        )
    if name == "lars":
        return LARS(groups, lr=lr, momentum=float(settings["momentum"]), weight_decay=weight_decay)
    if name == "lamb":
        # SparK's optimiser; torch has none, see medssl.lamb.
        return LAMB(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, sgd, lars or lamb")


def warmup_cosine(warmup_steps: int, total_steps: int) -> Any:
    """LR multiplier per step: linear warm-up to 1, then cosine decay to 0 at ``total_steps``.

    Per step rather than per epoch so short runs with few epochs still get a
    smooth schedule.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for one (seed, epoch, stream) triple.

    Streams: 0 = data order and worker base seeds, 1 = in-process augmentation.
    """
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint64)[0] >> 1)


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


def _epoch_loader(
    dataset: Dataset, batch_size: int, seed: int, epoch: int, num_workers: int, pin: bool
) -> tuple[DataLoader, torch.Generator]:
    """The DataLoader of one epoch, its order and augmentation seeded from (seed, epoch).

    Rebuilt every epoch (workers are not persistent) so that a resumed run
    starts each epoch from exactly the state an uninterrupted run had.
    """
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, 0))
    order = torch.randperm(len(dataset), generator=generator).tolist()
    if num_workers == 0 and hasattr(dataset, "reseed"):
        dataset.reseed(epoch_seed(seed, epoch, 1))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        drop_last=True,
        num_workers=num_workers,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=generator,
        pin_memory=pin,
    )
    return loader, generator


def _write_history(directory: Path, history: list[dict[str, float]]) -> None:
    write_csv(directory / HISTORY_NAME, pd.DataFrame(history, columns=HISTORY_COLUMNS))


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

    ``fingerprint`` describes the run (method, settings, seed, data); a
    checkpoint written under a different fingerprint is not resumed from,
    because continuing another configuration's weights would silently mix two
    experiments. Raises :class:`NonFiniteLossError` when the loss is NaN/inf.
    """
    config = train_settings(settings)
    device = torch.device(device)
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint_path = directory / CHECKPOINT_NAME
    epochs = int(config["epochs"])
    batch_size = int(config["batch_size"])
    steps_per_epoch = len(dataset) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(dataset)} pre-training samples are fewer than batch_size {batch_size}; "
            "lower pretrain.batch_size or raise max_samples"
        )
    total_steps = epochs * steps_per_epoch
    warmup_steps = round(float(config["warmup_epochs"]) * steps_per_epoch)
    on_cuda = device.type == "cuda"

    method.to(device)
    if on_cuda:
        method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, config)
    scheduler = LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
    fingerprint_text = _fingerprint_text(fingerprint)

    result = TrainResult()
    start_epoch = 0
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        if state.get("fingerprint") != fingerprint_text:
            log.warning(
                "%s was written by a different configuration; starting from scratch",
                checkpoint_path,
            )
        else:
            method.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            start_epoch = int(state["epoch"])
            result.history = [dict(row) for row in state["history"]]
            result.resumed_from = start_epoch
            log.info("resuming from %s at epoch %d of %d", checkpoint_path, start_epoch, epochs)

    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()
    )
    # A NaN check reads the loss back from the device; on CUDA do it every few
    # steps instead of every step so the GPU is not stalled each iteration.
    check_every = 25 if on_cuda else 1
    grad_clip = config["grad_clip"]

    for epoch in range(start_epoch, epochs):
        method.train()
        method.on_epoch_start(epoch)
        loader, generator = _epoch_loader(dataset, batch_size, seed, epoch, num_workers, on_cuda)
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        steps = 0
        for step_in_epoch, views in enumerate(loader):
            views = [view.to(device, non_blocking=True) for view in views]
            if on_cuda:
                views = [view.contiguous(memory_format=torch.channels_last) for view in views]
            with autocast:
                loss = method(views)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(method.parameters(), float(grad_clip))
            optimizer.step()
            scheduler.step()
            global_step = epoch * steps_per_epoch + step_in_epoch + 1
            method.on_step_end(global_step, total_steps)
            fault_point("pretrain.step")
            loss_sum += loss.detach().float()
            steps += 1
            if steps % check_every == 0 or steps == steps_per_epoch:
                _check_finite(loss_sum, epoch + 1, step_in_epoch + 1, checkpoint_path)
        seconds = time.perf_counter() - started
        mean_loss = float(loss_sum) / steps
        row = {
            "epoch": epoch + 1,
            "loss": mean_loss,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "images_per_s": steps * batch_size / seconds,
            "seconds": seconds,
        }
        result.history.append(row)
        log.info(
            "epoch %d/%d loss %.4f lr %.3g %.1f images/s",
            epoch + 1,
            epochs,
            mean_loss,
            row["lr"],
            row["images_per_s"],
        )
        if (epoch + 1) % int(config["checkpoint_every"]) == 0 or epoch + 1 == epochs:
            save_checkpoint(
                checkpoint_path,
                {
                    "model": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "history": result.history,
                    # "data" is a record only: each epoch's order generator is
                    # reseeded from (seed, epoch), which is what makes resuming exact.
                    "rng": {**rng_state(), "data": generator.get_state()},
                    "fingerprint": fingerprint_text,
                },
            )
            fault_point("pretrain.checkpoint_saved")
        _write_history(directory, result.history)
    if result.resumed_from == epochs:
        _write_history(directory, result.history)
    return result


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int, checkpoint: Path) -> None:
    """Raise :class:`NonFiniteLossError` if any loss summed so far is NaN or infinite."""
    if not bool(torch.isfinite(loss_sum)):
        raise NonFiniteLossError(
            f"pre-training loss became {float(loss_sum)} at epoch {epoch}, step {step} "
            f"(checked every few steps on GPU); the last good checkpoint, if any, is "
            f"{checkpoint}. Lower pretrain.lr, set pretrain.grad_clip, or check the data."
        )
