"""Training-step images/s of medssl's contrastive methods against the same ones from lightly.

For SimCLR, MoCo v2, BYOL, Barlow Twins and SwAV, both sides get the same
torchvision backbone (one set of initial weights, copied), the same head
widths, the same optimiser (SGD with momentum over every parameter) and the
same input tensors, drawn once before timing. medssl's side is its
:class:`~medssl.pretraining.methods.base.Method` driven as its trainer drives
it (forward, backward, step, ``on_step_end``); lightly's side is assembled
from its heads, losses and momentum helpers the way its documented examples
use them (one backbone pass per view, ``update_momentum`` each step). The two
sides alternate, repeat after repeat, so that load from other processes hits
both alike; the figure is the median over repeats, and the ratio is
medssl / lightly (above 1: medssl is faster).

    python bench/peer_throughput.py            # CPU: resnet18, 64 px, batch 32
    python bench/peer_throughput.py --device cuda --backbone resnet50 --image-size 224 \\
        --batch-size 256 --steps 20 --repeats 5 --bf16 --channels-last

``--bf16`` is bfloat16 autocast for both sides (medssl's trainer setting on a
GPU; for lightly the plain ``torch.autocast`` loop its docs show) and
``--channels-last`` puts both models and inputs in that memory format.
lightly is a benchmark-only dependency: ``pip install --no-deps lightly==1.6.0``
(the ``bench`` extra), which leaves torch as it is.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from lightly.loss import BarlowTwinsLoss, NegativeCosineSimilarity, NTXentLoss, SwaVLoss
from lightly.models.modules import (
    BarlowTwinsProjectionHead,
    BYOLPredictionHead,
    BYOLProjectionHead,
    MoCoProjectionHead,
    SimCLRProjectionHead,
    SwaVProjectionHead,
    SwaVPrototypes,
)
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from medssl.models.backbones import build_backbone, feature_dim
from medssl.pretraining.methods import build_method

METHODS = ("simclr", "moco_v2", "byol", "barlow_twins", "swav")

MOCO_QUEUE = 4096
"""Both MoCo queues: a multiple of every batch size the examples use, and small enough
for a CPU (medssl's default is fitted to the run, lightly's has no default)."""

TOTAL_STEPS = 1000
"""The run length both sides' momentum schedules (BYOL's cosine) are computed for."""

Step = Callable[[int], None]
"""One training step, given its 0-based index."""


def medssl_settings(name: str) -> dict[str, Any]:
    """medssl's defaults (the official head widths), with what lightly's side cannot match
    switched off: no SwAV freeze or queue, a fixed MoCo queue."""
    return {
        "simclr": {},
        "moco_v2": {"queue_size": MOCO_QUEUE},
        "byol": {"base_momentum": 0.996},
        "barlow_twins": {},
        "swav": {"freeze_prototypes_iters": 0, "queue_length": 0},
    }[name]


class Momentum(nn.Module):
    """A network and its momentum copy, as lightly's MoCo and BYOL examples build them."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.backbone_momentum = copy.deepcopy(backbone)
        self.head_momentum = copy.deepcopy(head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_momentum(self.backbone_momentum(x)).detach()

    def update(self, momentum: float) -> None:
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.head, self.head_momentum, m=momentum)


def lightly_model(name: str, backbone: nn.Module) -> tuple[nn.Module, Callable[..., Any]]:
    """lightly's model for ``name`` around ``backbone`` and a function from views to its loss."""
    d = feature_dim(backbone)
    if name == "simclr":
        model = nn.Sequential(backbone, SimCLRProjectionHead(d, d, 128))
        criterion = NTXentLoss(temperature=0.1)
        return model, lambda views, step: criterion(model(views[0]), model(views[1]))
    if name == "moco_v2":
        moco = Momentum(backbone, MoCoProjectionHead(d, d, 128))
        criterion = NTXentLoss(temperature=0.2, memory_bank_size=(MOCO_QUEUE, 128))

        def moco_loss(views: list[torch.Tensor], step: int) -> torch.Tensor:
            moco.update(0.999)
            return criterion(moco(views[0]), moco.forward_momentum(views[1]))

        return moco, moco_loss
    if name == "byol":
        byol = Momentum(backbone, BYOLProjectionHead(d, 4096, 256))
        predictor = BYOLPredictionHead(256, 4096, 256)
        byol.add_module("predictor", predictor)
        criterion = NegativeCosineSimilarity()

        def byol_loss(views: list[torch.Tensor], step: int) -> torch.Tensor:
            byol.update(cosine_schedule(step, TOTAL_STEPS, 0.996, 1.0))
            p0, p1 = predictor(byol(views[0])), predictor(byol(views[1]))
            z0, z1 = byol.forward_momentum(views[0]), byol.forward_momentum(views[1])
            return 0.5 * (criterion(p0, z1) + criterion(p1, z0))

        return byol, byol_loss
    if name == "barlow_twins":
        model = nn.Sequential(backbone, BarlowTwinsProjectionHead(d, 8192, 8192))
        criterion = BarlowTwinsLoss(lambda_param=0.0051)
        return model, lambda views, step: criterion(model(views[0]), model(views[1]))
    if name == "swav":
        swav = nn.ModuleDict(
            {
                "backbone": backbone,
                "head": SwaVProjectionHead(d, 2048, 128),
                "prototypes": SwaVPrototypes(128, n_prototypes=3000),
            }
        )
        criterion = SwaVLoss()

        def swav_loss(views: list[torch.Tensor], step: int) -> torch.Tensor:
            swav["prototypes"].normalize()
            scores = [
                swav["prototypes"](
                    nn.functional.normalize(swav["head"](swav["backbone"](v)), dim=1), step
                )
                for v in views
            ]
            return criterion(scores[:2], scores[2:])

        return swav, swav_loss
    raise ValueError(f"no lightly model for {name!r}; methods: {', '.join(METHODS)}")


def make_views(name: str, args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    """The batch's views, drawn once: 2 of ``image_size``, plus SwAV's 6 local crops."""
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.channels)
    sizes = [args.image_size] * 2
    if name == "swav":
        sizes += [round(args.image_size * 96 / 224)] * 6
    views = [torch.randn(*shape, s, s, generator=generator).to(device) for s in sizes]
    if args.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views


def optimiser(model: nn.Module) -> torch.optim.Optimizer:
    """The same SGD for both sides: every trainable parameter, one group."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-6)


def steps_for(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Step]:
    """One training step of each side of method ``name``, from one backbone initialisation."""
    torch.manual_seed(0)
    backbone = build_backbone(args.backbone, args.channels)
    ours = build_method(name, copy.deepcopy(backbone), medssl_settings(name)).to(device)
    theirs, their_loss = lightly_model(name, copy.deepcopy(backbone))
    theirs.to(device)
    if args.channels_last:
        ours.to(memory_format=torch.channels_last)
        theirs.to(memory_format=torch.channels_last)
    ours.train(), theirs.train()
    views = make_views(name, args, device)
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        if args.bf16
        else nullcontext
    )
    our_opt, their_opt = optimiser(ours), optimiser(theirs)

    def our_step(step: int) -> None:
        with autocast():
            loss = ours(views)
        our_opt.zero_grad(set_to_none=True)
        loss.backward()
        our_opt.step()
        ours.on_step_end(step + 1, TOTAL_STEPS)

    def their_step(step: int) -> None:
        with autocast():
            loss = their_loss(views, step)
        their_opt.zero_grad(set_to_none=True)
        loss.backward()
        their_opt.step()

    return {"medssl": our_step, "lightly": their_step}


def timed(step: Step, first: int, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` steps starting at index ``first``, the device synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for index in range(first, first + steps):
        step(index)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median images/s of both sides over ``args.repeats`` alternating repeats, and their ratio."""
    steps = steps_for(name, args, device)
    for step in steps.values():  # warm-up: allocator, autotuning, lazy initialisation
        timed(step, 0, args.warmup, device)
    rates: dict[str, list[float]] = {side: [] for side in steps}
    for repeat in range(args.repeats):
        order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
        for side in order:
            first = args.warmup + repeat * args.steps
            seconds = timed(steps[side], first, args.steps, device)
            rates[side].append(args.steps * args.batch_size / seconds)
    medians = {side: statistics.median(values) for side, values in rates.items()}
    return {
        "method": name,
        "medssl_images_per_s": round(medians["medssl"], 2),
        "lightly_images_per_s": round(medians["lightly"], 2),
        "ratio": round(medians["medssl"] / medians["lightly"], 3),
        "repeats": {side: [round(v, 2) for v in values] for side, values in rates.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats per side")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast on both sides")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for name in args.methods:
        print(json.dumps(measure(name, args, device)), flush=True)


if __name__ == "__main__":
    main()
