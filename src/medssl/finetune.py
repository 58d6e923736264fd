"""Stage ``finetune``: fine-tune one initialisation on one training subset; write metrics.json.

``python -m medssl.finetune --data H5 --partition CSV --subsets CSV... --fraction F --seed S...
--task JSON --settings JSON --init NAME [--masks H5] [--encoder PATH...] [--backbone NAME]
[--threads N] [--device auto|cpu|cuda] --out results/finetune/INIT/TASK/fracF/seedS/metrics.json``

One run = one (init, task, fraction, seed) cell of the benchmark
(:func:`medssl.finetuning.loop.finetune`). Several seeds (with one subsets
file each) run one after another in one process, to spare a large grid a
process start per run; ``--out`` then holds their list. The seeds share the
job's data (:func:`medssl.finetuning.loop.job_data`): one loader over the file
and, when they fit ``finetune.memory_budget_gb``, one read of the fixed
validation and test splits. ``--export-encoder``
also saves the selected model's backbone: a supervised initialisation. A run
that fails (a diverged loss, unusable inputs) writes nothing.

Beside ``--out``, each run's test predictions go to ``test_predictions.npz``
(one seed) or ``test_predictions_seed<s>.npz`` (several seeds in one job), named
by the run's ``test_predictions`` key; the format is in
:mod:`medssl.finetuning.metrics`. They are written before metrics.json, so a
metrics.json on disk always has its predictions beside it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medssl.cli import add_settings_argument, json_arg, resolve_device, stage_main
from medssl.core.files import write_json
from medssl.datasets.splits import read_partition, read_subsets
from medssl.finetuning.loop import (
    DEFAULT_BACKBONE,
    check_task,
    export_encoder,
    finetune,
    job_data,
)
from medssl.finetuning.metrics import save_predictions
from medssl.models.backbones import backbone_names

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
    parser.add_argument(
        "--encoder",
        nargs="+",
        help="encoder.pt to start from; omit for scratch. One file for every seed, or one "
        "per --seed in the same order (each seed's own pre-training run)",
    )
    parser.add_argument("--masks", help="mask file (medssl.masks) of a segmentation task")
    parser.add_argument(
        "--backbone",
        choices=backbone_names(),
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
    if args.encoder is not None and len(args.encoder) not in (1, len(args.seed)):
        raise ValueError(
            f"--encoder gives {len(args.encoder)} files for {len(args.seed)} seeds; "
            "give one for all seeds or one per seed"
        )
    if args.export_encoder and len(args.seed) != 1:
        raise ValueError("--export-encoder takes one --seed: the run whose backbone it saves")


def predictions_name(seed: int, n_seeds: int) -> str:
    """File name of a run's test predictions, beside its metrics.json."""
    return "test_predictions.npz" if n_seeds == 1 else f"test_predictions_seed{seed}.npz"


def run(args: argparse.Namespace) -> None:
    """Every seed's run, then the encoder (if asked for), the predictions, metrics.json last."""
    check_arguments(args)
    device = resolve_device(args.device)
    partition = read_partition(args.partition)
    runs, predictions = [], []
    encoders = [None] * len(args.seed) if args.encoder is None else args.encoder
    encoders = encoders * len(args.seed) if len(encoders) == 1 else encoders
    with job_data(args.data, args.masks, args.task, args.settings, device) as job:
        for seed, subsets, encoder in zip(args.seed, args.subsets, encoders, strict=True):
            result = finetune(
                data=args.data,
                partition=partition,
                subsets=read_subsets(subsets),
                fraction=args.fraction,
                seed=seed,
                task=args.task,
                settings=args.settings,
                init=args.init,
                encoder=encoder,
                backbone=args.backbone,
                device=device,
                masks=args.masks,
                job=job,
            )
            name = predictions_name(seed, len(args.seed))
            runs.append({**result.metrics, "test_predictions": name})
            predictions.append((Path(args.out).parent / name, result.predictions))
    if args.export_encoder:
        export_encoder(result, args.export_encoder, args.task, args.init, encoders[0])
        log.info("wrote %s", args.export_encoder)
    for path, arrays in predictions:
        save_predictions(path, arrays)
        log.info("wrote %s", path)
    # One seed: the run itself; several (compute.seeds_per_job): the list of runs.
    write_json(args.out, runs[0] if len(runs) == 1 else runs)
    log.info("wrote %s (%d run%s)", args.out, len(runs), "" if len(runs) == 1 else "s")


main = stage_main("finetune", DESCRIPTION, add_arguments, run, uses_torch=True)


if __name__ == "__main__":
    sys.exit(main())
