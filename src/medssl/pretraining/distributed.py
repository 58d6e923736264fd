"""Multi-process (DDP) plumbing: process group, rank queries, collectives for losses.

Pre-training runs as one process per GPU, started by ``torchrun`` (see
:func:`relaunch`) or by ``srun`` with torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
Without them everything here degrades to the single-process identity, so
methods call :func:`gather` unconditionally.

Losses over the global batch (SimCLR's negatives, Barlow Twins'
cross-correlation, SwAV's Sinkhorn) gather embeddings with gradient. Every
rank then computes the same global loss; the gradient that flows back
through :func:`gather` to a rank's own embeddings is the sum over ranks,
i.e. ``world_size`` times the global loss's gradient, which DDP's
gradient averaging divides out again. The result equals one process with
the whole batch (tested with the gloo backend on CPU).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""Variables torchrun (or srun with them exported) sets for every process."""


@dataclass(frozen=True)
class Context:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, the history CSV and the exported encoder."""
        return self.rank == 0


def launched() -> bool:
    """True inside a process started by torchrun (its variables are set)."""
    return all(name in os.environ for name in LAUNCH_ENV)


def context_from_env() -> Context:
    """The :class:`Context` described by torchrun's environment, or a single process."""
    if not launched():
        return Context()
    try:
        ctx = Context(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        )
    except ValueError as err:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {err}") from None
    if not 0 <= ctx.rank < ctx.world_size:
        raise ValueError(f"RANK {ctx.rank} is outside WORLD_SIZE {ctx.world_size}")
    return ctx


def init(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns the context and device.

    On CUDA each process takes GPU ``LOCAL_RANK``. A single process (no
    torchrun variables, or a world of one) initialises nothing.
    """
    ctx = context_from_env()
    if ctx.world_size == 1:
        return ctx, device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        log.info("rank %d of %d joined (%s on %s)", ctx.rank, ctx.world_size, backend, device)
    return ctx, device


def shutdown() -> None:
    """Leave the process group (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True when a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


class _Gather(torch.autograd.Function):
    """``all_gather`` along dim 0 whose backward sums each rank's slice over ranks.

    Written out because ``torch.distributed.nn.functional.all_gather`` is
    deprecated and its replacement is private; an ``all_reduce`` of the
    gathered gradient works with every backend, gloo included.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = (dist.get_rank() * len(tensor), (dist.get_rank() + 1) * len(tensor))
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        start, end = ctx.rows
        return total[start:end]


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated along dim 0 in rank order, with gradient.

    Every rank must pass the same shape.
    """
    if not active():
        return tensor
    return _Gather.apply(tensor)


@torch.no_grad()
def gather_detached(tensor: torch.Tensor) -> torch.Tensor:
    """:func:`gather` without gradient (targets, queue entries); cheaper in backward."""
    if not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``tensor`` as rank ``src`` holds it, on every rank (in place)."""
    if active():
        dist.broadcast(tensor, src)
    return tensor


@torch.no_grad()
def mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of ``tensor`` (a copy; for logging and divergence checks)."""
    if not active():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def barrier() -> None:
    """Wait until every rank gets here."""
    if active():
        dist.barrier()


def relaunch(module: str, argv: Sequence[str], nproc: int) -> int:
    """Run ``python -m module argv`` as ``nproc`` processes under ``torch.distributed.run``.

    Lets a workflow rule stay one command (``python -m medssl.pretrain --nproc 4``)
    on a single node; torchrun picks a free rendezvous port (``--standalone``).
    Multi-node jobs start torchrun themselves under ``srun`` instead (docs/decisions.md).
    Returns torchrun's exit status, which is non-zero when any rank failed.
    """
    if nproc < 2:
        raise ValueError(f"relaunch needs at least 2 processes, got {nproc}")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *argv,
    ]
    log.info("starting %d processes: %s", nproc, " ".join(command))
    return subprocess.run(command, check=False).returncode
