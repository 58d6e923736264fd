"""Fine-tuning throughput per backbone family: images/s of forward+backward and peak memory.

One small network per family (ResNet, ConvNeXt, ViT patch 16 and 14, Swin), a
classification head and the family's segmentation decoder, batch 8 of
1-channel slices, AdamW steps on CPU (or the current CUDA device). Prints one
table; peak memory is the process's maximum resident set on CPU (it only
grows, so networks run in increasing size) and torch's peak allocation per network
on a GPU. ``--sizes base`` measures the base size of each family (on a GPU).

    python bench/finetune_families.py [--size 64] [--steps 5] [--batch 8]
    python bench/finetune_families.py --sizes base --size 224 --batch 32 --device cuda
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from medssl.finetuning.tasktypes import Classifier, task_type
from medssl.models import backbones as models

FAMILIES = [
    ("resnet18", 64),
    ("convnext_atto", 64),
    ("deit_tiny_patch16_224", 64),
    ("vit_small_patch14_reg4_dinov2", 56),
    ("swin_tiny_patch4_window7_224", 64),
]
"""The tiny size of each family (``--sizes tiny``, for a CPU); the side is fitted per family."""

BASE_FAMILIES = [
    ("resnet50", 224),
    ("convnext_base", 224),
    ("deit_base_patch16_224", 224),
    ("vit_base_patch14_dinov2", 224),
    ("swin_base_patch4_window7_224", 224),
]
"""The base size of each family (``--sizes base``, for a GPU at 224 px)."""


def _fit(name: str, size: int) -> int:
    """``size`` rounded down to what the backbone accepts (a patch of 14 needs multiples of 14)."""
    for side in range(size, 0, -1):
        if models.check_input_size(name, side, side) is None and side % 2 == 0:
            if name.startswith(("resnet", "convnext", "swin")) and side % 32:
                continue
            return side
    raise ValueError(f"no valid size <= {size} for {name}")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def measure(
    model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor, steps: int
) -> float:
    """Images per second over ``steps`` AdamW steps after one warm-up step."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        loss_fn(model(images), target).backward()
        optimiser.step()

    step()
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if images.is_cuda:
        torch.cuda.synchronize()
    return steps * len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sizes", choices=("tiny", "base"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    families = FAMILIES if args.sizes == "tiny" else BASE_FAMILIES
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}")
    print(f"{'backbone':32s} {'px':>4s} {'cls img/s':>10s} {'seg img/s':>10s} {'peak MB':>9s}")
    for name, _ in families:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        side = _fit(name, args.size)
        torch.manual_seed(0)
        images = torch.randn(args.batch, 1, side, side, device=device)
        classifier = Classifier(models.build_backbone(name, 1), 1).to(device)
        labels = torch.randint(0, 2, (args.batch, 1), device=device).float()
        cls_rate = measure(classifier, images, labels, args.steps)
        seg = (
            task_type("segmentation")
            .build_model(models.build_backbone(name, 1), 1, {"decoder_channels": None})
            .to(device)
        )
        masks = (images > 0.5).float()
        seg_rate = measure(seg, images, masks, args.steps)
        print(f"{name:32s} {side:4d} {cls_rate:10.1f} {seg_rate:10.1f} {_peak_mb(device):9.0f}")


if __name__ == "__main__":
    main()
