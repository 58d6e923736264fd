"""Stage ``finetune``: fine-tune one initialisation on one training subset; write metrics.json.

``python -m medssl.finetune --data H5 --partition CSV --subsets CSV... --fraction F --seed S...
--task JSON --settings JSON --init NAME [--masks H5] [--encoder PATH] [--backbone NAME]
[--threads N] [--device auto|cpu|cuda] --out results/finetune/INIT/TASK/fracF/seedS/metrics.json``

One run = one (init, task, fraction, seed) cell of the benchmark
(:func:`medssl.finetuning.loop.finetune`). Several seeds (with one subsets
file each) run one after another in one process, to spare a large grid a
process start per run; ``--out`` then holds their list. ``--export-encoder``
also saves the selected model's backbone: a supervised initialisation. A run
that fails (a diverged loss, unusable inputs) writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medssl.cli import add_settings_argument, json_arg, resolve_device, stage_main
from medssl.core.files import write_json
from medssl.datasets.splits import read_partition, read_subsets
from medssl.finetuning.loop import DEFAULT_BACKBONE, check_task, export_encoder, finetune
from medssl.models.backbones import BACKBONES

log = logging.getLogger(__name__)

DESCRIPTION = "Fine-tune one initialisation on one training subset; write metrics.json."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The run's inputs, identity and outputs; ``--threads``/``--device`` come from the runner."""
    parser.add_argument("--data", required=True, help="converted dataset (.h5)")
    parser.add_argument("--partition", required=True, help="partition CSV (medssl.split)")
    parser.add_argument(
        "--subsets",
        required=True,
        nargs="+",
        help="subset ranks CSV (medssl.subsample), one per --seed, in the same order",
    )
    parser.add_argument("--fraction", required=True, type=float, help="training fraction in (0, 1]")
    parser.add_argument(
        "--seed",
        required=True,
        type=int,
        nargs="+",
        help="run seed (init, order, augmentation); several seeds run one after another "
        "in this process and --out gets a list of runs",
    )
    parser.add_argument("--task", required=True, type=json_arg, help="task JSON with name and type")
    add_settings_argument(parser, help="config finetune section (JSON)")
    parser.add_argument(
        "--init", required=True, help="initialisation name recorded in metrics.json"
    )
    parser.add_argument("--encoder", help="encoder.pt to start from; omit for scratch")
    parser.add_argument("--masks", help="mask file (medssl.masks) of a segmentation task")
    parser.add_argument(
        "--backbone",
        choices=BACKBONES.names(),
        help=f"backbone for scratch runs (default {DEFAULT_BACKBONE}); an encoder's sidecar wins",
    )
    parser.add_argument("--out", required=True, help="metrics.json to write")
    parser.add_argument(
        "--export-encoder",
        help="also save the selected model's backbone as an encoder.pt (supervised "
        "initialisation, e.g. ImageNet then a labelled medical task); one seed only",
    )


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse a command line whose seeds, subsets files and export do not fit together.

    Checked before any training, so a wrong job fails in a second, not after its first run.
    """
    check_task(args.task)
    if len(args.subsets) != len(args.seed):
        raise ValueError(
            f"{len(args.seed)} seeds but {len(args.subsets)} --subsets files: "
            "give one subsets file per seed, in the same order"
        )
    if len(set(args.seed)) != len(args.seed):
        raise ValueError(f"--seed lists a seed twice: {args.seed}")
    if args.export_encoder and len(args.seed) != 1:
        raise ValueError("--export-encoder takes one --seed: the run whose backbone it saves")


def run(args: argparse.Namespace) -> None:
    """Every seed's run, then the encoder (if asked for), then metrics.json last."""
    check_arguments(args)
    device = resolve_device(args.device)
    partition = read_partition(args.partition)
    runs = []
    for seed, subsets in zip(args.seed, args.subsets, strict=True):
        result = finetune(
            data=args.data,
            partition=partition,
            subsets=read_subsets(subsets),
            fraction=args.fraction,
            seed=seed,
            task=args.task,
            settings=args.settings,
            init=args.init,
            encoder=args.encoder,
            backbone=args.backbone,
            device=device,
            masks=args.masks,
        )
        runs.append(result.metrics)
    if args.export_encoder:
        export_encoder(result, args.export_encoder, args.task, args.init, args.encoder)
        log.info("wrote %s", args.export_encoder)
    # One seed: the run itself; several (compute.seeds_per_job): the list of runs.
    write_json(args.out, runs[0] if len(runs) == 1 else runs)
    log.info("wrote %s (%d run%s)", args.out, len(runs), "" if len(runs) == 1 else "s")


main = stage_main("finetune", DESCRIPTION, add_arguments, run, uses_torch=True)


if __name__ == "__main__":
    sys.exit(main())
