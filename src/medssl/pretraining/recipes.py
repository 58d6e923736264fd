"""Stage ``pretrain``: self-supervised pre-training of an encoder on the unlabelled pool.

::

    python -m medssl.pretrain --method simclr --data results/data/lidc.h5 \\
        --settings '<pretrain section as JSON>' --seed 0 \\
        --out results/init/simclr/encoder.pt --checkpoint-dir results/pretrain/simclr \\
        [--threads N] [--device auto|cpu|cuda] [--num-workers N] [--init-encoder PATH] [--nproc N]

``--nproc N`` (alias ``--gpus``) with N > 1 restarts the command as N
processes under ``torch.distributed.run`` on this node: one per GPU (NCCL),
or N gloo processes on CPU. A job started by torchrun itself (several
nodes under ``srun``) needs no flag: the process group comes from torchrun's
environment. ``batch_size`` is the global batch in every case.

Every slice of the HDF5 file is used (or a seeded random ``max_samples``
subset for quick runs); no label is read. The checkpoint directory holds
``checkpoint.pt`` and ``history.csv``; a rerun resumes from the checkpoint.
The encoder is exported only after training finished with a finite loss.
With ``--init-encoder`` (continual, domain-adaptive pre-training) the backbone
starts from that encoder file, whose sidecar decides the backbone and stem,
instead of from random weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medssl.datasets import hdf5 as data
from medssl.pretraining import distributed
from medssl.models import backbones as models
from medssl.core import provenance
from medssl.pretraining.augment import MultiViewDataset
from medssl.cli import json_arg, resolve_device, set_threads, setup_logging
from medssl.pipeline.codedeps import code_digest
from medssl.pretraining.methods import METHODS, build_method
from medssl.core.seeding import seed_everything
from medssl.pretraining.loop import NonFiniteLossError, train

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
    recipe of the original's optimiser (:attr:`medssl.pretraining.methods.Method.optim_recipe`).
    """
    method_settings = dict(settings.get(method) or {})
    optim = dict(method_settings.pop("optim", None) or {})
    unknown = sorted(set(optim) - OPTIM_KEYS)
    if unknown:
        raise KeyError(
            f"pretrain.{method}.optim has unknown keys {unknown}; allowed: {sorted(OPTIM_KEYS)}"
        )
    return method_settings, {**settings, **optim}


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
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; registered: {sorted(METHODS)}")
    settings = dict(settings)
    method_settings, train_settings = split_method_settings(method, settings)
    ctx, torch_device = distributed.init(resolve_device(device))
    # The same seed on every rank: identical initial weights (DDP also
    # broadcasts rank 0's); the trainer gives each rank its own data streams.
    seed_everything(seed)
    backbone_name = settings.get("backbone", "resnet_small")
    indices = pool_indices(data_path, settings.get("max_samples"), seed)
    channels, height, width = data.image_shape(data_path)
    start: dict[str, Any] | None = None
    if init_encoder is None:
        backbone = models.build_backbone(backbone_name, channels)
    else:
        backbone, start = start_from_encoder(init_encoder, channels)
        backbone_name = start["backbone"]
        settings["backbone"] = backbone_name
    model = build_method(method, backbone, method_settings)
    augment = {**(settings.get("augment") or {}), **model.augment_overrides()}
    views = model.make_views(augment, seed)
    dataset = MultiViewDataset(image_pool(data_path, indices), views)
    log.info(
        "pre-training %s (%s) on %d slices of %dx%dx%d from %s on %s",
        method,
        backbone_name,
        len(dataset),
        channels,
        height,
        width,
        data_path,
        torch_device,
    )
    data_stat = Path(data_path).stat()
    # A checkpoint is resumed only by the same job: same settings and seed, the
    # same pool file and the same code. A finished run's checkpoint is thus never
    # "resumed" after an edit that Snakemake reruns the job for.
    fingerprint = {
        "method": method,
        "settings": settings,
        "seed": seed,
        "n_samples": len(indices),
        "image_shape": [channels, height, width],
        "data": {"size": data_stat.st_size, "mtime_ns": data_stat.st_mtime_ns},
        "code": code_digest("pretrain"),
        "init_encoder": None if init_encoder is None else _file_stamp(init_encoder),
    }
    if ctx.world_size > 1:
        # Another process count trains on other per-rank streams: not the same run.
        fingerprint["world_size"] = ctx.world_size
    if int(settings.get("gpus", ctx.world_size)) != ctx.world_size:
        log.warning(
            "pretrain.gpus is %s but this job runs %d process(es); pass --nproc %s",
            settings["gpus"],
            ctx.world_size,
            settings["gpus"],
        )
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
    info = {
        "method": method,
        "epochs": len(result.history),
        "final_loss": result.final_loss,
        "loss_history": [row["loss"] for row in result.history],
        "n_samples": len(indices),
        "init_encoder": None if start is None else {"path": str(init_encoder), "sidecar": start},
        "provenance": provenance.record("pretrain", settings, seed),
    }
    if ctx.is_main:
        models.save_encoder(model.encoder().cpu(), out, backbone_name, info)
        log.info("wrote %s (final loss %.4f)", out, result.final_loss)
    distributed.barrier()
    return info


def start_from_encoder(path: str | Path, channels: int) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone of encoder file ``path`` and its sidecar; it must take ``channels`` inputs."""
    backbone, info = models.load_encoder(path)
    if int(info["in_channels"]) != channels:
        raise ValueError(
            f"{path}: encoder takes {info['in_channels']} input channels, the pool has {channels}"
        )
    log.info("starting from encoder %s (%s)", path, info.get("method", info["backbone"]))
    return backbone, info


def _file_stamp(path: str | Path) -> dict[str, Any]:
    stat = Path(path).stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line."""
    parser = argparse.ArgumentParser(prog="python -m medssl.pretrain", description=__doc__)
    parser.add_argument("--method", required=True, help=f"one of {sorted(METHODS)}")
    parser.add_argument("--data", required=True, type=Path, help="converted HDF5 pool")
    parser.add_argument("--settings", required=True, type=json_arg, help="pretrain section (JSON)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path, help="encoder file to write")
    parser.add_argument("--checkpoint-dir", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument(
        "--init-encoder", type=Path, default=None, help="encoder.pt to start the backbone from"
    )
    parser.add_argument(
        "--nproc",
        "--gpus",
        dest="nproc",
        type=int,
        default=1,
        help="processes on this node (one per GPU; gloo processes on CPU); >1 starts torchrun",
    )
    parser.add_argument("--verbose", action="store_true")
    return parser


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--gpus N``, which torchrun would read as its own."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--nproc", "--gpus"):
            skip = True
        elif not arg.startswith(("--nproc=", "--gpus=")):
            kept.append(arg)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exits with a one-line error when the loss diverges."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.nproc < 1:
        raise SystemExit(f"error: --nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and not distributed.launched():
        forwarded = without_nproc(sys.argv[1:] if argv is None else argv)
        return distributed.relaunch("medssl.pretraining.recipes", forwarded, args.nproc)
    if args.threads is not None:
        set_threads(args.threads)
    try:
        pretrain(
            args.method,
            args.data,
            args.settings,
            args.seed,
            args.out,
            args.checkpoint_dir,
            device=args.device,
            num_workers=args.num_workers,
            init_encoder=args.init_encoder,
        )
    except NonFiniteLossError as err:
        log.error("%s", err)
        raise SystemExit(f"error: {err}") from None
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
