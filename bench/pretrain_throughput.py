"""Pre-training throughput (images/s) of every registered method, fp32 against bf16.

Two loops (``--loop``):

* ``step`` (default) times what the trainer does per step (forward,
  backward, optimiser step, ``on_step_end``) on views made once before
  timing, so the figure is the model's speed, not the augmentation's.
* ``trainer`` runs :func:`medssl.pretraining.loop.train` itself for two epochs of
  ``--steps`` steps on a random in-memory pool, with the real augmentation,
  DataLoader (``--num-workers``), optimiser recipe and schedule, and reports
  the second epoch's images/s and ``data_wait_fraction`` (host time blocked
  on the loader / epoch time) from the trainer's history.

A sample counts once whatever its number of views (SwAV's 8 crops are one image).

    python bench/pretrain_throughput.py                         # CPU: resnet_small, 64x64, fp32
    python bench/pretrain_throughput.py --backbone resnet50 --size 224 --batch 128 \\
        --device cuda --precision fp32 bf16 --loop trainer --num-workers 8

``bf16`` means what the trainer does on CUDA: bfloat16 autocast and
channels_last. ``--narrow-heads`` replaces the official head widths
(8,192-wide Barlow Twins projector, 4,096-wide BYOL MLPs...) with CPU-sized
ones, so that the backbone, not a head, is what a small CPU run measures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import torch

from medssl.models.backbones import build_backbone
from medssl.pretraining.augment import MultiViewDataset
from medssl.pretraining.loop import train
from medssl.pretraining.methods import METHODS, build_method
from medssl.pretraining.recipes import TensorImages

NARROW_HEADS: dict[str, dict[str, Any]] = {
    "barlow_twins": {"proj_dims": [512, 512, 512]},
    "byol": {"hidden_dim": 512, "proj_dim": 128},
    "moco_v2": {"queue_size": 4096},
    "swav": {"hidden_dim": 512, "n_prototypes": 300},
}


def measure(
    name: str,
    args: argparse.Namespace,
    precision: str,
    device: torch.device,
) -> float:
    """Images per second of ``name`` over ``args.steps`` timed steps after warm-up."""
    torch.manual_seed(0)
    settings = NARROW_HEADS.get(name, {}) if args.narrow_heads else {}
    method = build_method(name, build_backbone(args.backbone, args.channels), settings)
    images = torch.rand(args.batch, args.channels, args.size, args.size)
    views = [view.to(device) for view in method.make_views({}, seed=0)(images)]
    method.to(device).train()
    fast = precision == "bf16"
    if fast:
        method.to(memory_format=torch.channels_last)
        views = [view.contiguous(memory_format=torch.channels_last) for view in views]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if fast else nullcontext()
    optimizer = torch.optim.AdamW(method.optimizer_groups(), lr=1e-4)
    total = args.warmup + args.steps

    def step(index: int) -> None:
        with autocast:
            loss = method(views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.on_step_end(index, total)

    for index in range(1, args.warmup + 1):
        step(index)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for index in range(args.warmup + 1, total + 1):
        step(index)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch / (time.perf_counter() - started)


def measure_trainer(
    name: str, args: argparse.Namespace, precision: str, device: torch.device
) -> dict[str, float]:
    """Second-epoch images/s and data-wait fraction of the real training loop."""
    torch.manual_seed(0)
    settings = NARROW_HEADS.get(name, {}) if args.narrow_heads else {}
    method = build_method(name, build_backbone(args.backbone, args.channels), settings)
    pool = torch.rand(args.batch * args.steps, args.channels, args.size, args.size)
    augment = method.augment_overrides()
    dataset = MultiViewDataset(TensorImages(pool), method.make_views(augment, seed=0))
    config = {
        "epochs": 2,
        "batch_size": args.batch,
        "precision": precision,
        "warmup_epochs": 0,
        "checkpoint_every": 1000,
    }
    with tempfile.TemporaryDirectory() as directory:
        result = train(
            method,
            dataset,
            config,
            checkpoint_dir=directory,
            seed=0,
            device=device,
            num_workers=args.num_workers,
        )
    last = result.history[-1]
    return {
        "images_per_s": float(f"{last['images_per_s']:.3g}"),
        "data_wait_fraction": round(last["data_wait_fraction"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=sorted(METHODS))
    parser.add_argument("--backbone", default="resnet_small")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--narrow-heads", action="store_true")
    parser.add_argument("--loop", choices=["step", "trainer"], default="step")
    parser.add_argument("--num-workers", type=int, default=0, help="trainer loop's loader workers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; registered: {sorted(METHODS)}")
    print(f"# {args.backbone} {args.size}x{args.size} batch {args.batch} on {device}, {args.loop}")
    for name in args.methods:
        for precision in args.precision:
            if args.loop == "trainer":
                figures = measure_trainer(name, args, precision, device)
            else:
                figures = {"images_per_s": float(f"{measure(name, args, precision, device):.3g}")}
            print(json.dumps({"method": name, "precision": precision, **figures}))


if __name__ == "__main__":
    main()
