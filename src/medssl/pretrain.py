"""Stage ``pretrain``: self-supervised pre-training of an encoder on the unlabelled pool.

::

    python -m medssl.pretrain --method simclr --data results/data/lidc.h5 \\
        --settings '<pretrain section as JSON>' --seed 0 \\
        --out results/init/simclr/encoder.pt --checkpoint-dir results/pretrain/simclr \\
        [--threads N] [--device auto|cpu|cuda] [--num-workers N] [--init-encoder PATH] [--nproc N]

``--nproc N`` (alias ``--gpus``) with N > 1 restarts the command as N
processes under ``torch.distributed.run`` on this node: one per GPU (NCCL),
or N gloo processes on CPU. This process then only waits: it exits 0 when
every rank did, else 1 with torchrun's exit status in its error line (each
rank has logged its own error above). A job started by torchrun itself
(several nodes under ``srun``) needs no flag: the process group comes from
torchrun's environment. ``batch_size`` is the global batch in every case.

The work is :func:`medssl.pretraining.recipes.pretrain`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from medssl.cli import add_settings_argument, stage_main
from medssl.pretraining import distributed
from medssl.pretraining.methods import method_names
from medssl.pretraining.recipes import pretrain

log = logging.getLogger(__name__)

DESCRIPTION = "Self-supervised pre-training of an encoder on the unlabelled pool."

NPROC_FLAGS = ("--nproc", "--gpus")

MODULE = "medssl.pretrain"
"""What every torchrun process runs (``__name__`` is ``__main__`` under ``python -m``)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, help=f"one of {method_names()}")
    parser.add_argument("--data", required=True, type=Path, help="converted HDF5 pool")
    add_settings_argument(parser, "pretrain section (JSON)", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path, help="encoder file to write")
    parser.add_argument("--checkpoint-dir", required=True, type=Path)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument(
        "--init-encoder", type=Path, default=None, help="encoder.pt to start the backbone from"
    )
    parser.add_argument(
        *NPROC_FLAGS,
        dest="nproc",
        type=int,
        default=1,
        help="processes on this node (one per GPU; gloo processes on CPU); >1 starts torchrun",
    )


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--gpus N``, which torchrun would read as its own."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in NPROC_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in NPROC_FLAGS)):
            kept.append(arg)
    return kept


def relaunch(argv: Sequence[str], nproc: int) -> None:
    """Run this command as ``nproc`` torchrun processes; raise if any of them failed."""
    status = distributed.relaunch(MODULE, without_nproc(argv), nproc)
    if status != 0:
        raise RuntimeError(
            f"{nproc} pre-training processes under torchrun exited with status {status}"
        )


def run(args: argparse.Namespace) -> None:
    """Pre-train here, or relaunch the command line as several processes."""
    if args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and not distributed.launched():
        relaunch(args.command_line, args.nproc)
        return
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
    finally:
        distributed.shutdown()


main = stage_main("pretrain", DESCRIPTION, add_arguments, run, uses_torch=True)


if __name__ == "__main__":
    sys.exit(main())
