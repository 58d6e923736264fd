"""Images/s and peak GPU memory of every pre-training method's step, fp32 and bf16.

One step is what :func:`medssl.pretraining.loop.train` does per batch:
forward through the method (all its views), backward, the method's own
optimiser (its ``optim_recipe``: LARS for SimCLR and BYOL, LAMB for SparK...),
``on_step_end``. The views are made once beforehand, so augmentation is not
timed here (``data_wait`` in device_check measures it in the real loop).
``bf16`` is the trainer's CUDA setting: bfloat16 autocast and channels_last.

Each (method, precision) is timed for ``--steps`` steps or ``--seconds``,
whichever ends first, after ``--warmup`` steps (cuDNN picks its kernels
then); one JSON line is printed per figure as soon as it exists, so a run
stopped at its time limit still leaves what it measured.

    python bench/device/throughput.py --device cuda --backbone resnet50 --size 224 --batch 128
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

from medssl.models.backbones import build_backbone
from medssl.pretraining.loop import build_optimizer, train_settings
from medssl.pretraining.methods import build_method, method_names

QUICK_HEADS = {
    "barlow_twins": {"proj_dims": [128, 128, 128]},
    "byol": {"hidden_dim": 128, "proj_dim": 32},
    "moco_v2": {"queue_size": 256},
    "swav": {"hidden_dim": 128, "n_prototypes": 64, "queue_length": 0},
    "simclr": {"proj_dim": 32},
}
"""CPU-sized heads for ``--quick`` (the official widths dominate a tiny backbone)."""


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall time is device time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, precision: str, args: argparse.Namespace) -> dict[str, object]:
    """Images/s and peak memory of one method at one precision."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    settings = QUICK_HEADS.get(name, {}) if args.quick else {}
    method = build_method(name, build_backbone(args.backbone, args.channels), settings)
    images = torch.rand(args.batch, args.channels, args.size, args.size)
    views = [view.to(device) for view in method.make_views(method.augment_overrides(), 0)(images)]
    method.to(device).train()
    fast = precision == "bf16"
    if fast:
        method.to(memory_format=torch.channels_last)
        views = [view.contiguous(memory_format=torch.channels_last) for view in views]
    config = train_settings({"batch_size": args.batch}, method.optim_recipe)
    optimizer = build_optimizer(method, config)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if fast else nullcontext()
    total = args.warmup + args.steps

    def step(index: int) -> None:
        with autocast:
            loss = method(views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.on_step_end(index + 1, total)  # 1-based, as the trainer counts

    for index in range(args.warmup):
        step(index)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    steps = 0
    while steps < args.steps and time.perf_counter() - started < args.seconds:
        step(args.warmup + steps)
        steps += 1
        synchronize(device)  # per step: the time check must see finished work
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "method": name,
        "precision": precision,
        "images_per_s": round(steps * args.batch / seconds, 1),
        "steps": steps,
        "peak_gib": None if peak is None else round(peak, 2),
        "optimizer": config["optimizer"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=method_names())
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="timing limit per figure")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="CPU-sized heads")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    for name in args.methods:
        for precision in args.precision:
            try:
                row = measure(name, precision, args)
            except (RuntimeError, ValueError) as err:  # e.g. out of memory: report, go on
                row = {"method": name, "precision": precision, "error": str(err)[:300]}
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
