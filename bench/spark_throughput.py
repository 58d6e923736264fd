"""Images/s of SparK training steps (forward, backward, LAMB step) on random slices.

    python bench/spark_throughput.py [--backbone resnet_small] [--size 64] [--batch 64]
        [--impls gather,dense_masked,dense] [--decoder-widths 768,128] [--steps 5]
        [--rounds 3] [--threads 2] [--device cpu|cuda] [--precision auto|fp32|bf16]
        [--memory-format auto|contiguous|channels_last] [--quick]

Compares, in one process and interleaved round by round (so a change in the
machine's load hits every variant alike), each sparse BatchNorm
implementation (``gather``, ``dense_masked``) and ``dense``, the same network
and loss with no sparse emulation at all (the floor the emulation's cost is
measured against), at each decoder width. Prints the median images/s of each
variant and the median over rounds of its ratio to the first variant in the
same round; never asserts them. The first step of
every variant is a warm-up and not timed. The backbone gets SparK's recipe for
a random start (zero-initialised residual norms, stochastic depth 0.05).

On a GPU, e.g. ``--device cuda --backbone resnet50 --size 224 --batch 128``:
``auto`` precision and memory format are then the trainer's CUDA setting
(bfloat16 autocast, channels_last; fp32 and contiguous on a CPU), and the
clock is read after ``torch.cuda.synchronize()``, so queued work is counted.
``--quick`` (the device check's short run) times one round at the official
decoder width only. Each variant also prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from medssl.models import backbones as models
from medssl.pretraining.loop import build_optimizer, train_settings
from medssl.pretraining.methods import build_method, method_class
from medssl.pretraining.methods.loss_helpers import wide
from medssl.pretraining.methods.spark import (
    DOWNSAMPLE,
    SparK,
    masked_patch_loss,
    random_mask,
    stage_features,
)
from medssl.pretraining.methods.sparse import SPARSE_IMPLS

VARIANTS = (*SPARSE_IMPLS, "dense")


def dense_loss(method: SparK, images: torch.Tensor) -> torch.Tensor:
    """SparK's step with no mask set: every layer dense, the loss still on hidden patches."""
    n, _, height, width = images.shape
    active = random_mask(n, height // DOWNSAMPLE, width // DOWNSAMPLE, 0.6, images.device)
    features = stage_features(method.backbone, images)
    skips = [
        proj(norm(feature))
        for feature, norm, proj in zip(
            reversed(features), method.densify_norms, method.densify_projs, strict=True
        )
    ]
    return masked_patch_loss(images, wide(method.decoder(skips)), active, DOWNSAMPLE)


def build(args: argparse.Namespace, variant: str, width: int) -> tuple[SparK, Callable]:
    """A SparK method, its optimiser step and its loss function for one variant."""
    torch.manual_seed(0)
    options = models.resolve_backbone_options(
        None, method_class("spark").backbone_recipe, random_start=True
    )
    backbone = models.build_backbone(args.backbone, 1, **options)
    impl = variant if variant in SPARSE_IMPLS else "dense_masked"
    method = build_method("spark", backbone, {"decoder_width": width, "sparse_impl": impl})
    method = method.to(args.device)
    if args.memory_format == "channels_last":
        method = method.to(memory_format=torch.channels_last)
    settings = train_settings({"optimizer": "lamb", "lr": 2e-4, "batch_size": args.batch})
    optimizer = build_optimizer(method, settings)
    loss_of = (lambda images: dense_loss(method, images)) if variant == "dense" else None

    def step(images: torch.Tensor) -> None:
        with torch.autocast(args.device.type, torch.bfloat16, enabled=args.precision == "bf16"):
            loss = loss_of(images) if loss_of else method([images])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return method, step


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable, images: torch.Tensor, steps: int, device: torch.device) -> float:
    """Images/s over ``steps`` steps after the clock starts on an idle device."""
    synchronise(device)
    started = time.perf_counter()
    for _ in range(steps):
        step(images)
    synchronise(device)
    return steps * images.shape[0] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="resnet_small")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--impls", default=",".join(VARIANTS))
    parser.add_argument("--decoder-widths", default="768,128")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument(
        "--memory-format", choices=("auto", "contiguous", "channels_last"), default="auto"
    )
    parser.add_argument("--quick", action="store_true", help="one round, decoder width 768")
    args = parser.parse_args()
    on_gpu = args.device.type == "cuda"
    if args.precision == "auto":
        args.precision = "bf16" if on_gpu else "fp32"
    if args.memory_format == "auto":
        args.memory_format = "channels_last" if on_gpu else "contiguous"
    if args.quick:
        args.rounds, args.decoder_widths = 1, "768"
    variants = args.impls.split(",")
    for variant in variants:
        if variant not in VARIANTS:
            parser.error(f"--impls: unknown {variant!r}; known: {', '.join(VARIANTS)}")
    widths = [int(w) for w in args.decoder_widths.split(",")]
    torch.set_num_threads(args.threads)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    images = torch.rand(args.batch, 1, args.size, args.size, device=args.device)
    if args.memory_format == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    runs: dict[tuple[str, int], Callable] = {}
    for width in widths:
        for variant in variants:
            method, step = build(args, variant, width)
            step(images)  # warm-up: allocator, cuDNN autotuning, optimiser state
            runs[variant, width] = step
            del method
    rates: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, step in runs.items():
            rates[key].append(time_steps(step, images, args.steps, args.device))
    print(
        f"spark {args.backbone} {args.size}x{args.size} batch {args.batch} {args.device} "
        f"{args.precision} {args.memory_format} "
        f"threads {args.threads}, median of {args.rounds} rounds x {args.steps} steps"
    )
    # Ratios are taken within a round, where the machine's load was shared.
    first = next(iter(rates.values()))
    rows = []
    for (variant, width), values in rates.items():
        ratio = statistics.median(v / f for v, f in zip(values, first, strict=True))
        rows.append(
            {
                "variant": variant,
                "decoder_width": width,
                "images_per_s": round(statistics.median(values), 2),
                "ratio_to_first": round(ratio, 3),
            }
        )
        print(
            f"  {variant:<13} decoder {width:>4}: {statistics.median(values):8.1f} images/s  "
            f"x{ratio:.2f} of the first  (rounds: {', '.join(f'{v:.1f}' for v in values)})"
        )
    for row in rows:
        print(json.dumps({"bench": "spark_throughput", "backbone": args.backbone, **row}))


if __name__ == "__main__":
    main()
