"""One fine-tuning epoch with the streamed loader: images/s and the share spent waiting for data.

Runs :func:`medssl.finetuning.loop._train_epoch` (the loop the stage runs)
on the device check's labelled cohort with every split streamed
(``JobData`` mode ``streamed``), and times each wait for the next batch
from the loader. ``data_wait_fraction`` is the waits' sum over the epoch's
wall time: the time the host was blocked on the loader, an upper bound on
the time the device starved (the host may wait while the device still
computes queued steps). Prints one JSON line.

    python bench/device/finetune_wait.py --data H5 --partition CSV --subsets CSV \\
        --device cuda --backbone resnet50 --batch 64 --workers 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from medssl.datasets.splits import read_partition, read_subsets
from medssl.finetuning import loop as ft
from medssl.finetuning.streaming import StreamedRows

TASK = {"name": "square", "dataset": "device", "column": "square", "type": "binary"}


def timed(source: StreamedRows, waits: list[float]) -> None:
    """Wrap ``source.batches`` so each wait for a batch (read, copy, conversion) is recorded."""
    real = source.batches

    def batches(positions):
        iterator = real(positions)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            waits.append(time.perf_counter() - started)
            yield batch

    source.batches = batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--partition", required=True)
    parser.add_argument("--subsets", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    settings = {"epochs": 1, "batch_size": args.batch, "num_workers": args.workers}
    started = time.perf_counter()
    partition = read_partition(args.partition)
    job = ft.job_data(args.data, None, TASK, settings, args.device, mode="streamed")
    with job:
        run = ft.prepare_run(
            args.data, partition, read_subsets(args.subsets), 1.0, 0, TASK, settings,
            "scratch", backbone=args.backbone, device=args.device, job=job,
        )  # fmt: skip
        waits: list[float] = []
        timed(run.data.train, waits)
        epoch_started = time.perf_counter()
        ft._train_epoch(run, True, 1)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - epoch_started
    n = len(run.data.train)
    print(
        json.dumps(
            {
                "backbone": args.backbone,
                "batch": args.batch,
                "workers": args.workers,
                "n_train": n,
                "images_per_s": round(n / seconds, 1),
                "step_s": round(seconds / max(len(waits), 1), 4),
                "data_wait_fraction": round(sum(waits) / seconds, 4),
                "first_batch_wait_s": round(waits[0], 3) if waits else None,
                "setup_s": round(epoch_started - started, 2),
                "time_to_first_step_s": round(epoch_started - started + (waits or [0])[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
