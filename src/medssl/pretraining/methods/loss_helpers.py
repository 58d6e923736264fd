"""What every method's loss function needs: float32 arithmetic and an input check.

Each loss lives in its method's module, so that a method's code is one file
(:mod:`medssl.pipeline.codedeps` reruns a method's jobs when that file
changes); only these helpers are shared by all of them.
"""

from __future__ import annotations

import torch


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it already is.

    The losses run in float32 under autocast because log-sum-exps and
    batch standardisation lose too much in bfloat16; float64 input stays
    float64 so precise comparisons (the DDP test) are not capped at float32.
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_pair(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise unless ``a`` and ``b`` are two (N, D) tensors of one shape (loss ``name``'s inputs)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"{name} needs two (N, D) tensors of one shape, got {a.shape}, {b.shape}")
