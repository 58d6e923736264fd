"""Images/s of SparK training steps (forward, backward, LAMB step) on random slices.

    python bench/spark_throughput.py [--backbone resnet_small] [--size 64] [--batch 64]
        [--decoder-width 768] [--steps 5] [--threads 2]

Prints the figure; never asserts it. The first step is a warm-up and not timed.
"""

from __future__ import annotations

import argparse
import time

import torch

from medssl.models import backbones as models
from medssl.pretraining.loop import build_optimizer, train_settings
from medssl.pretraining.methods import build_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="resnet_small")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--decoder-width", type=int, default=768)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = models.build_backbone(args.backbone, 1)
    method = build_method("spark", backbone, {"decoder_width": args.decoder_width})
    settings = train_settings({"optimizer": "lamb", "lr": 2e-4, "batch_size": args.batch})
    optimizer = build_optimizer(method, settings)
    images = torch.rand(args.batch, 1, args.size, args.size)
    for step in range(args.steps + 1):
        if step == 1:
            started = time.perf_counter()
        loss = method([images])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    print(
        f"spark {args.backbone} {args.size}x{args.size} batch {args.batch} "
        f"decoder {args.decoder_width} threads {args.threads}: "
        f"{args.steps * args.batch / seconds:.1f} images/s"
    )


if __name__ == "__main__":
    main()
