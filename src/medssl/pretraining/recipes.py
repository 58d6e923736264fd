"""Self-supervised pre-training of an encoder on the unlabelled pool (stage ``pretrain``).

Every slice of the HDF5 file is used (or a seeded random ``max_samples``
subset for quick runs); no label is read. The checkpoint directory holds
``checkpoint.pt`` and ``history.csv``; a rerun resumes from the checkpoint.
The encoder is exported only after training finished with a finite loss.
With ``init_encoder`` (continual, domain-adaptive pre-training) the backbone
starts from that encoder file, whose sidecar decides the backbone and stem,
instead of from random weights. Under DDP (:mod:`medssl.pretraining.distributed`)
every rank runs :func:`pretrain`; ``batch_size`` is the global batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medssl.cli import resolve_device
from medssl.core import provenance
from medssl.core.registry import look_up
from medssl.core.seeding import seed_everything
from medssl.datasets import hdf5 as data
from medssl.models import backbones as models
from medssl.pipeline.codedeps import code_digest
from medssl.pretraining import distributed
from medssl.pretraining.augment import MultiViewDataset
from medssl.pretraining.loop import StepPlan, TrainResult, plan_steps, train
from medssl.pretraining.loop import train_settings as trainer_config
from medssl.pretraining.methods import build_method, method_class, method_module
from medssl.pretraining.methods.base import Method

OPTIM_KEYS = frozenset(
    {
        "optimizer",
        "lr",
        "lr_scaling",
        "weight_decay",
        "weight_decay_end",
        "momentum",
        "warmup_epochs",
        "final_lr_fraction",
        "grad_clip",
    }
)
"""Trainer keys a method's ``optim`` sub-section may set for that method alone."""

PRETRAIN_DEFAULTS: dict[str, Any] = {
    "backbone": "resnet_small",
    "max_samples": None,
    "augment": {},
}
"""Values of the ``pretrain`` keys this module reads when the settings lack them
(trainer keys: :data:`medssl.pretraining.loop.TRAINER_DEFAULTS`)."""

log = logging.getLogger(__name__)

IN_MEMORY_LIMIT_BYTES = 2 * 1024**3
"""Pools smaller than this as float32 are read into memory once; larger ones lazily."""


class TensorImages(Dataset):
    """In-memory ``(N, C, H, W)`` images as a dataset of ``(C, H, W)`` tensors.

    Forked DataLoader workers share the tensor copy-on-write instead of
    reopening the HDF5 file for every slice.
    """

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, item: int) -> torch.Tensor:
        return self.images[item]


def pool_indices(path: str | Path, max_samples: int | None, seed: int) -> np.ndarray:
    """Sorted HDF5 rows to pre-train on: all, or a seeded random subset of ``max_samples``."""
    with data.open_h5(path) as handle:
        total = int(handle[data.IMAGES].shape[0])
    if max_samples is None or int(max_samples) >= total:
        return np.arange(total)
    if int(max_samples) < 1:
        raise ValueError(f"max_samples must be positive or null, got {max_samples}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=int(max_samples), replace=False))


def image_pool(path: str | Path, indices: np.ndarray) -> Dataset:
    """The images as a dataset: in memory when small enough, else read lazily from HDF5."""
    channels, height, width = data.image_shape(path)
    size = len(indices) * channels * height * width * 4
    if size < IN_MEMORY_LIMIT_BYTES:
        return TensorImages(data.load_images(path, indices))
    log.info("pool is %.1f GB as float32; reading slices lazily", size / 1024**3)
    return data.SliceDataset(path, indices)


def split_method_settings(
    method: str, settings: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``pretrain.<method>`` without its ``optim`` key, and the trainer settings.

    The trainer settings are the shared ``pretrain`` keys overridden by
    ``pretrain.<method>.optim``; keys neither sets come from the method's
    recipe of the original's optimiser
    (:attr:`medssl.pretraining.methods.base.Method.optim_recipe`).
    """
    method_settings = dict(settings.get(method) or {})
    optim = dict(method_settings.pop("optim", None) or {})
    for key in sorted(set(optim) - OPTIM_KEYS):
        look_up(f"pretrain.{method}.optim key", key, OPTIM_KEYS)
    return method_settings, {**settings, **optim}


def plan_run(
    method: str, train_settings: Mapping[str, Any], n_samples: int, world_size: int
) -> tuple[dict[str, Any], StepPlan]:
    """The trainer settings resolved as :func:`medssl.pretraining.loop.train` resolves them
    (over the method's recipe), and the run's steps on ``n_samples`` over ``world_size`` ranks.
    """
    config = trainer_config(train_settings, method_class(method).optim_recipe)
    return config, plan_steps(config, n_samples, world_size)


def fit_method_settings(
    method: str, method_settings: Mapping[str, Any], plan: StepPlan
) -> dict[str, Any]:
    """Every setting of ``method``: the config's, the defaults, and null ones fitted to ``plan``.

    The run-dependent defaults (SwAV's queue, BYOL's momentum, MoCo's queue)
    are resolved once the run's length is known: here, before the method is built.
    """
    cls = method_class(method)
    return cls.fit_to_run(cls.resolve_settings(method_settings), plan)


def warmup_warnings(trainer: Mapping[str, Any], plan: StepPlan) -> list[str]:
    """A warm-up at least as long as the run: the rate never reaches its peak, never decays."""
    if plan.warmup_steps < plan.total_steps or plan.warmup_steps == 0:
        return []
    reached = plan.total_steps / plan.warmup_steps
    return [
        f"warmup_epochs {trainer['warmup_epochs']} is {plan.warmup_steps} steps, not shorter "
        f"than the run's {plan.total_steps} ({plan.epochs} epochs of {plan.steps_per_epoch}): "
        f"the learning rate reaches {100 * reached:.0f} % of its peak and never decays; "
        f"lower warmup_epochs (pretrain or pretrain.<method>.optim)"
    ]


def check_schedule(
    method: str, method_settings: Mapping[str, Any], trainer: Mapping[str, Any], plan: StepPlan
) -> list[str]:
    """Why a part of this run would stay untrained, one message per part (empty: none).

    ``method_settings`` are the fitted ones (:func:`fit_method_settings`),
    ``trainer`` and ``plan`` those of :func:`plan_run`. Checks the warm-up and
    what the method itself checks
    (:meth:`medssl.pretraining.methods.base.Method.schedule_warnings`: frozen
    prototypes, queues that never start or fill, momentum targets that hardly move).
    """
    return warmup_warnings(trainer, plan) + method_class(method).schedule_warnings(
        method_settings, plan
    )


@dataclass(frozen=True)
class Start:
    """The network a run begins with: a fresh backbone or that of an encoder file."""

    backbone: nn.Module
    backbone_name: str
    sidecar: dict[str, Any] | None
    """The start encoder's sidecar; None for random weights."""


def start_backbone(
    settings: Mapping[str, Any],
    channels: int,
    init_encoder: str | Path | None,
    recipe: Mapping[str, Any] | None = None,
) -> Start:
    """Random ``settings['backbone']`` weights, or the backbone of encoder file ``init_encoder``.

    ``recipe`` is the method's ``backbone_recipe`` (SparK: zero-initialised last
    BatchNorm of every block and stochastic depth, as its official backbone),
    which ``pretrain.backbone_options`` overrides key by key; it shapes a
    backbone built from random weights only, and only its stochastic depth
    applies to one continued from an encoder.
    """
    options = models.resolve_backbone_options(
        settings.get("backbone_options"),
        recipe or {},
        random_start=init_encoder is None,
        backbone=settings.get("backbone", PRETRAIN_DEFAULTS["backbone"]),
    )
    if init_encoder is None:
        name = settings.get("backbone", PRETRAIN_DEFAULTS["backbone"])
        return Start(models.build_backbone(name, channels, **options), name, None)
    backbone, sidecar = start_from_encoder(init_encoder, channels)
    if options["drop_path"] > 0:
        models.set_drop_path(backbone, options["drop_path"])
    return Start(backbone, sidecar["backbone"], sidecar)


def start_from_encoder(path: str | Path, channels: int) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone of encoder file ``path`` and its sidecar; it must take ``channels`` inputs."""
    backbone, info = models.load_encoder(path)
    if int(info["in_channels"]) != channels:
        raise ValueError(
            f"{path}: encoder takes {info['in_channels']} input channels, the pool has {channels}"
        )
    log.info("starting from encoder %s (%s)", path, info.get("method", info["backbone"]))
    return backbone, info


def view_dataset(
    model: Method,
    settings: Mapping[str, Any],
    seed: int,
    data_path: str | Path,
    indices: np.ndarray,
) -> MultiViewDataset:
    """The pool as lists of the method's views (its augmentation keys over ``pretrain.augment``)."""
    augment = {
        **(settings.get("augment") or PRETRAIN_DEFAULTS["augment"]),
        **model.augment_overrides(),
    }
    views = model.make_views(augment, seed)
    return MultiViewDataset(image_pool(data_path, indices), views)


def run_fingerprint(
    method: str,
    settings: Mapping[str, Any],
    seed: int,
    data_path: str | Path,
    indices: np.ndarray,
    init_encoder: str | Path | None,
    world_size: int,
) -> dict[str, Any]:
    """What makes a checkpoint resumable: the same settings, seed, pool file and code.

    A finished run's checkpoint is thus never "resumed" after an edit that
    Snakemake reruns the job for. The code is the stage's and the method's own
    module (which the stage imports by name, out of reach of static imports).
    """
    data_stat = Path(data_path).stat()
    fingerprint = {
        "method": method,
        "settings": settings,
        "seed": seed,
        "n_samples": len(indices),
        "image_shape": list(data.image_shape(data_path)),
        "data": {"size": data_stat.st_size, "mtime_ns": data_stat.st_mtime_ns},
        "code": code_digest("pretrain", method_module(method).removeprefix("medssl.")),
        "init_encoder": None if init_encoder is None else _file_stamp(init_encoder),
    }
    if world_size > 1:
        # Another process count trains on other per-rank streams: not the same run.
        fingerprint["world_size"] = world_size
    return fingerprint


def _warn_about_process_count(settings: Mapping[str, Any], world_size: int) -> None:
    """``pretrain.gpus`` is a resource request; a job that got another count says so."""
    if int(settings.get("gpus", world_size)) != world_size:
        log.warning(
            "pretrain.gpus is %s but this job runs %d process(es); pass --nproc %s",
            settings["gpus"],
            world_size,
            settings["gpus"],
        )


def pretrain(
    method: str,
    data_path: str | Path,
    settings: Mapping[str, Any],
    seed: int,
    out: str | Path,
    checkpoint_dir: str | Path,
    device: str = "auto",
    num_workers: int = 0,
    init_encoder: str | Path | None = None,
) -> dict[str, Any]:
    """Pre-train ``method`` and export its encoder to ``out``; returns the sidecar info.

    ``init_encoder``: an encoder file to start the backbone from (its sidecar's
    backbone replaces ``settings['backbone']``).

    Raises :class:`medssl.pretraining.loop.NonFiniteLossError` (and writes no encoder)
    when the loss diverges.
    """
    method_module(method)  # an unknown method fails here, before any work
    settings = dict(settings)
    method_settings, train_settings = split_method_settings(method, settings)
    ctx, torch_device = distributed.init(resolve_device(device))
    # The same seed on every rank: identical initial weights (DDP also
    # broadcasts rank 0's); the trainer gives each rank its own data streams.
    seed_everything(seed)
    indices = pool_indices(data_path, settings.get("max_samples"), seed)
    channels, height, width = data.image_shape(data_path)
    recipe = getattr(method_class(method), "backbone_recipe", {})
    start = start_backbone(settings, channels, init_encoder, recipe)
    if start.sidecar is not None:
        settings["backbone"] = start.backbone_name
    trainer, plan = plan_run(method, train_settings, len(indices), ctx.world_size)
    method_settings = fit_method_settings(method, method_settings, plan)
    for message in check_schedule(method, method_settings, trainer, plan):
        log.warning("%s: %s", method, message)
    model = build_method(method, start.backbone, method_settings)
    dataset = view_dataset(model, settings, seed, data_path, indices)
    log.info(
        "pre-training %s (%s) on %d slices of %dx%dx%d from %s on %s",
        method,
        start.backbone_name,
        len(dataset),
        channels,
        height,
        width,
        data_path,
        torch_device,
    )
    fingerprint = run_fingerprint(
        method, settings, seed, data_path, indices, init_encoder, ctx.world_size
    )
    _warn_about_process_count(settings, ctx.world_size)
    result = train(
        model,
        dataset,
        train_settings,
        checkpoint_dir=checkpoint_dir,
        seed=seed,
        device=torch_device,
        num_workers=num_workers,
        fingerprint=fingerprint,
    )
    info = encoder_info(method, settings, seed, result, len(indices), init_encoder, start)
    info["method_settings"] = method_settings
    # Where it ran, so the cost table can tell GPU-hours from CPU time.
    info["device"] = str(torch_device)
    info["world_size"] = ctx.world_size
    if ctx.is_main:
        models.save_encoder(model.encoder().cpu(), out, start.backbone_name, info)
        log.info("wrote %s (final loss %.4f)", out, result.final_loss)
    distributed.barrier()
    return info


def encoder_info(
    method: str,
    settings: Mapping[str, Any],
    seed: int,
    result: TrainResult,
    n_samples: int,
    init_encoder: str | Path | None,
    start: Start,
) -> dict[str, Any]:
    """What the encoder's sidecar records about its pre-training."""
    return {
        "method": method,
        "epochs": len(result.history),
        "final_loss": result.final_loss,
        "loss_history": [row["loss"] for row in result.history],
        "n_samples": n_samples,
        "init_encoder": (
            None if start.sidecar is None else {"path": str(init_encoder), "sidecar": start.sidecar}
        ),
        "provenance": provenance.record("pretrain", settings, seed),
    }


def _file_stamp(path: str | Path) -> dict[str, Any]:
    stat = Path(path).stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
