"""Fine-tune one initialisation on one labelled subset and score it on the fixed test split.

``python -m medssl.finetune --data H5 --partition CSV --subsets CSV... --fraction F --seed S...
--task JSON --settings JSON --init NAME [--masks H5] [--encoder PATH] [--backbone NAME]
[--threads N] [--device auto|cpu|cuda] --out results/finetune/INIT/TASK/fracF/seedS/metrics.json``

One run = one (init, task, fraction, seed) cell of the benchmark. Several
seeds (with one subsets file each) run one after another in one process, to
spare a large grid a process start per run; ``--out`` then holds their list. The model is
the backbone (random from ``--backbone`` when there is no ``--encoder``: the
scratch baseline) plus what the task type puts on it (:mod:`medssl.finetuning.tasktypes`:
a linear head, or a U-Net decoder for segmentation, whose masks come from
``--masks``). The protocol (:mod:`medssl.finetuning.protocols`) says per epoch whether the
backbone trains and at what learning rate. Each epoch trains on the subset and
scores the validation split; the state with the best validation
``select_metric`` (earliest on ties) is restored and scored once on the test
split (optionally with test-time augmentation, :mod:`medssl.finetuning.tta`), so the test
set never influences any choice. With ``patience`` the run stops after that
many epochs without a better validation score.

The run is deterministic on CPU for a given seed: the seed drives the head
(and scratch backbone) initialisation, batch order and augmentation. A run
whose loss or scores become NaN/inf stops with an error and writes nothing, so
a diverged run can never enter the tables as a number.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medssl.cli import json_arg, resolve_device, set_threads, setup_logging
from medssl.datasets.hdf5 import load_images
from medssl.core.directions import HIGHER_IS_BETTER
from medssl.core.faults import fault_point
from medssl.core.files import write_json
from medssl.datasets.maskfile import load_masks
from medssl.models.backbones import BACKBONES, build_backbone, load_encoder, save_encoder
from medssl.finetuning.protocols import PROTOCOLS, Protocol, make_protocol
from medssl.core.provenance import record
from medssl.core.seeding import seed_everything
from medssl.datasets.splits import read_partition, read_subsets, select_training
from medssl.finetuning.tasktypes import TASK_TYPES, TaskType, task_type
from medssl.finetuning.tta import TTA_MODES, predict_with_tta

log = logging.getLogger(__name__)

DEFAULT_SETTINGS: dict[str, Any] = {
    "protocol": "full",
    "epochs": 10,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 5e-4,
    "optimizer": "adam",
    "select_metric": "auto",
    "patience": None,
    "tta": "none",
    "freeze_epochs": 10,
    "unfreeze_lr_factor": 0.1,
    "unfreeze_lr_growth": 2.0,
    "seg_loss": "dice",
    "decoder_channels": None,
    "augment": True,
    "class_weights": "balanced",
    "num_workers": 0,
}
SELECT_METRICS = ("auto", "auc", "accuracy", "f1", "dice", "iou", "loss")
CHOICES = {
    "protocol": tuple(PROTOCOLS),
    "optimizer": ("adam", "adamw", "sgd"),
    "select_metric": SELECT_METRICS,
    "tta": TTA_MODES,
    "seg_loss": ("dice", "bce", "dice_bce"),
    "class_weights": ("balanced", "none"),
}
DEFAULT_BACKBONE = "resnet_small"
EVAL_BATCH = 256
SHIFT_FRACTION = 1 / 16
"""Largest random shift as a fraction of the image side (4 pixels at 64x64)."""


class FinetuneError(RuntimeError):
    """A run that cannot produce trustworthy metrics (divergence, unusable inputs)."""


def resolve_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """The config ``finetune`` section with defaults filled in and values checked.

    Unknown keys are errors: a misspelt setting silently replaced by its
    default would make a whole sweep measure the wrong thing.
    """
    given = dict(settings or {})
    unknown = sorted(set(given) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(
            f"finetune settings: unknown key(s) {unknown}; allowed {sorted(DEFAULT_SETTINGS)}"
        )
    resolved = {**DEFAULT_SETTINGS, **given}
    for key, allowed in CHOICES.items():
        if resolved[key] not in allowed:
            raise ValueError(f"finetune settings: {key}={resolved[key]!r} is not one of {allowed}")
    if int(resolved["epochs"]) < 1 or int(resolved["batch_size"]) < 1:
        raise ValueError("finetune settings: epochs and batch_size must be at least 1")
    if not float(resolved["lr"]) > 0 or float(resolved["weight_decay"]) < 0:
        raise ValueError("finetune settings: lr must be > 0 and weight_decay >= 0")
    if resolved["patience"] is not None and int(resolved["patience"]) < 1:
        raise ValueError("finetune settings: patience must be at least 1, or null for none")
    if int(resolved["freeze_epochs"]) < 0:
        raise ValueError("finetune settings: freeze_epochs must be >= 0")
    if (
        not 0 < float(resolved["unfreeze_lr_factor"]) <= 1
        or float(resolved["unfreeze_lr_growth"]) < 1
    ):
        raise ValueError(
            "finetune settings: unfreeze_lr_factor must be in (0, 1] and unfreeze_lr_growth >= 1"
        )
    return resolved


def select_metric_for(settings: dict[str, Any], task: dict[str, Any], kind: TaskType) -> str:
    """The validation metric that picks the epoch: ``auto`` is the task's own ``metric``."""
    select = settings["select_metric"]
    if select == "auto":
        select = task.get("metric") or kind.metrics[0]
    if select != "loss" and select not in kind.metrics:
        raise ValueError(
            f"task {task.get('name')!r}: select_metric {select!r} is not a {kind.name} metric "
            f"({list(kind.metrics)} or loss)"
        )
    return select


@dataclass
class FinetuneResult:
    """What a run produced: the metrics.json payload and the selected model."""

    metrics: dict[str, Any]
    model: nn.Module
    backbone: str = DEFAULT_BACKBONE


def augment_batch(
    images: torch.Tensor, generator: torch.Generator, masks: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Random left-right flips and small shifts, independently per image.

    Only left-right flips: an up-down flipped axial CT slice (spine above the
    heart) is not an image the model will ever see. Shifts pad by replicating
    the border, because a zero pad is not "background" under every intensity
    policy. ``masks`` (segmentation targets, N x 1 x H x W) move with their
    images; both are returned then.
    """
    channels = images.shape[1]
    joined = images if masks is None else torch.cat([images, masks.to(images.dtype)], dim=1)
    batch, _, height, width = joined.shape
    flip = torch.rand(batch, generator=generator) < 0.5
    out = torch.where(flip.view(-1, 1, 1, 1).to(joined.device), joined.flip(-1), joined)
    pad = max(1, round(SHIFT_FRACTION * min(height, width)))
    padded = nn.functional.pad(out, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator).tolist()
    shifted = torch.stack(
        [padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)]
    )
    if masks is None:
        return shifted
    return shifted[:, :channels], shifted[:, channels:].to(masks.dtype)


def _batches(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split a permutation into batches, folding a trailing single sample into the last batch.

    BatchNorm in training mode cannot normalise a batch of one when the last
    feature map is 1x1 (small inputs), and dropping the sample would waste a label.
    """
    chunks = list(torch.split(order, size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def balanced_class_weights(labels: torch.Tensor, task_type: str, n_outputs: int) -> torch.Tensor:
    """Weights that give every class the same total weight in the training loss.

    Rare positives (a nodule in one slice out of ten) otherwise teach the model
    to answer "negative" at the 0.5 threshold, which leaves F1 at zero however
    well the scores rank. Binary: n_negative / n_positive as BCE's
    ``pos_weight``; multi-class: n / (K * n_k), 0 for a class absent from the
    subset (it contributes no samples anyway); multi-label: n_neg / n_pos per label.
    """
    criterion = TASK_TYPES[task_type].criterion({}, labels, n_outputs)
    weight = getattr(criterion, "pos_weight", None)
    return weight if weight is not None else criterion.weight


def _optimizer(settings: dict[str, Any], groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    lr, decay = float(settings["lr"]), float(settings["weight_decay"])
    if settings["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=decay)
    if settings["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=decay)
    return torch.optim.SGD(groups, lr=lr, weight_decay=decay, momentum=0.9)


def _param_groups(model: nn.Module, protocol: Protocol) -> list[dict[str, Any]]:
    """One optimiser group per part, named so the protocol can set each part's lr."""
    groups = [{"name": "head", "params": list(model.head.parameters())}]
    if protocol.trains_backbone_ever():
        groups.insert(0, {"name": "backbone", "params": list(model.backbone.parameters())})
    return groups


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, kind: TaskType, tta: str = "none"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities of ``model`` on ``images`` (eval mode), and the logits when tta is none."""
    model.eval()
    logits = torch.cat([model(chunk) for chunk in torch.split(images, EVAL_BATCH)])
    if not torch.isfinite(logits).all():
        raise FinetuneError("model outputs are NaN/inf: the run diverged")
    if tta == "none":
        return kind.probabilities(logits), logits

    def probabilities(views: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [kind.probabilities(model(chunk)) for chunk in torch.split(views, EVAL_BATCH)]
        )

    return predict_with_tta(probabilities, images, tta, kind.dense), logits


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    kind: TaskType | str,
    tta: str = "none",
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics and mean (unweighted) loss of ``model`` on one split."""
    kind = task_type(kind) if isinstance(kind, str) else kind
    probs, logits = predict(model, images, kind, tta)
    criterion = kind.criterion(settings or DEFAULT_SETTINGS, None, int(logits.shape[1]))
    with torch.no_grad():
        loss = float(kind.loss(criterion, logits, targets))
    if not math.isfinite(loss):
        raise FinetuneError(f"validation loss is {loss}: the run diverged")
    return {**kind.score(targets, probs), "loss": loss}


def _train_epoch(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    settings: dict[str, Any],
    kind: TaskType,
    train_backbone: bool,
    generator: torch.Generator,
    epoch: int,
) -> float:
    """One pass over the training subset; returns the sample-weighted mean loss."""
    model.train()
    model.backbone.requires_grad_(train_backbone)
    if not train_backbone:
        # Frozen means frozen: BatchNorm must not update its running statistics either.
        model.backbone.eval()
    order = torch.randperm(len(images), generator=generator)
    total, seen = 0.0, 0
    for batch in _batches(order, int(settings["batch_size"])):
        x = images[batch.to(images.device)]
        y = targets[batch.to(targets.device)]
        if settings["augment"]:
            if kind.dense:
                x, y = augment_batch(x, generator, y)
            else:
                x = augment_batch(x, generator)
        if train_backbone:
            logits = model(x)
        else:
            with torch.no_grad():
                features = model.features(x)
            logits = model.decode(features)
        loss = kind.loss(criterion, logits, y)
        if not torch.isfinite(loss):
            raise FinetuneError(
                f"epoch {epoch}: training loss is {float(loss.detach())}; the run diverged "
                f"(lr={settings['lr']}, optimizer={settings['optimizer']})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(batch)
        seen += len(batch)
    return total / seen


def _is_better(value: float, best: float | None, metric: str) -> bool:
    """Strictly better (ties keep the earlier epoch); NaN never wins."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if HIGHER_IS_BETTER[metric] else value < best


def _split_rows(partition: pd.DataFrame, name: str) -> pd.DataFrame:
    rows = partition.loc[partition["split"] == name].sort_values("index")
    if rows.empty:
        raise FinetuneError(f"partition has no {name!r} rows")
    return rows


def build_model(
    task_type_name: str,
    n_outputs: int,
    in_channels: int,
    encoder: str | Path | None,
    backbone: str | None,
    settings: dict[str, Any] | None = None,
) -> tuple[nn.Module, str, dict | None]:
    """The network to fine-tune, the backbone name it uses and the encoder sidecar.

    ``n_outputs`` is what the task type asks for (1 for binary). Call after
    seeding: the scratch backbone and the head draw from torch's RNG.
    """
    info: dict | None = None
    if encoder is None:
        name = backbone or DEFAULT_BACKBONE
        net = build_backbone(name, in_channels)
    else:
        net, info = load_encoder(encoder)
        name = info["backbone"]
        if backbone is not None and backbone != name:
            log.warning(
                "--backbone %s ignored: encoder %s is a %s (its sidecar decides)",
                backbone,
                encoder,
                name,
            )
        if int(info["in_channels"]) != in_channels:
            raise FinetuneError(
                f"{encoder}: encoder takes {info['in_channels']} input channels, "
                f"the data has {in_channels}"
            )
    kind = task_type(task_type_name)
    return kind.build_model(net, n_outputs, resolve_settings(settings)), name, info


def _targets(
    kind: TaskType,
    partition: pd.DataFrame,
    every: np.ndarray,
    masks: str | Path | None,
    n_outputs: int,
    device: torch.device,
) -> torch.Tensor:
    """Training targets of the rows ``every``: label codes, label bits, or masks."""
    if kind.dense:
        if masks is None:
            raise FinetuneError("a segmentation task needs --masks (medssl.datasets.mask_sources output)")
        return torch.from_numpy(load_masks(masks, every)).unsqueeze(1).float().to(device)
    label_of = partition.set_index("index")["label"]
    codes = torch.as_tensor(label_of.loc[every].to_numpy(copy=True), dtype=torch.int64)
    return kind.targets(codes, n_outputs).to(device)


def finetune(
    data: str | Path,
    partition: pd.DataFrame,
    subsets: pd.DataFrame,
    fraction: float,
    seed: int,
    task: dict[str, Any],
    settings: dict[str, Any] | None,
    init: str,
    encoder: str | Path | None = None,
    backbone: str | None = None,
    device: str | torch.device = "cpu",
    masks: str | Path | None = None,
) -> FinetuneResult:
    """Run one fine-tuning and return the metrics.json payload and the selected model.

    ``task`` needs ``name`` and ``type`` (and ``columns`` for multilabel);
    ``settings`` is the config ``finetune`` section (missing keys take
    :data:`DEFAULT_SETTINGS`); ``masks`` is the task's mask file for
    segmentation. Raises :class:`FinetuneError` when the run diverges; nothing
    is written here.
    """
    started = time.perf_counter()
    settings = resolve_settings(settings)
    if not task.get("name") or "type" not in task:
        raise ValueError(f"task must name 'name' and 'type', got {task!r}")
    kind = task_type(task["type"])
    if kind.name == "multilabel" and not task.get("columns"):
        raise ValueError(f"multilabel task {task['name']!r} needs 'columns'")
    select = select_metric_for(settings, task, kind)
    protocol = make_protocol(settings)
    device = torch.device(device)
    generator = seed_everything(seed)

    train_idx = select_training(partition, subsets, fraction)
    val_rows, test_rows = _split_rows(partition, "val"), _split_rows(partition, "test")
    n_codes = int(partition["label"].max()) + 1
    if kind.name == "binary" and n_codes != 2:
        raise FinetuneError(
            f"binary task {task.get('name')!r} but partition labels are 0..{n_codes - 1}"
        )
    if protocol.trains_backbone_ever() and len(train_idx) < 2:
        raise FinetuneError(
            f"protocol {protocol.name} needs at least 2 training slices (BatchNorm)"
        )
    n_outputs = kind.n_outputs(task, n_codes)

    sizes = (len(train_idx), len(val_rows), len(test_rows))
    every = np.concatenate([train_idx, val_rows["index"].to_numpy(), test_rows["index"].to_numpy()])
    # channels_last runs the small convolutions of these networks ~20 % faster on CPU.
    images = load_images(data, every).to(device).contiguous(memory_format=torch.channels_last)
    targets = _targets(kind, partition, every, masks, n_outputs, device)
    x_train, x_val, x_test = torch.split(images, sizes)
    y_train, y_val, y_test = torch.split(targets, sizes)

    model, backbone_name, info = build_model(
        kind.name, n_outputs, images.shape[1], encoder, backbone, settings
    )
    model.to(device=device, memory_format=torch.channels_last)
    groups = _param_groups(model, protocol)
    optimizer = _optimizer(settings, groups)
    weights = y_train if settings["class_weights"] == "balanced" and not kind.dense else None
    criterion = kind.criterion(settings, weights, n_outputs)

    if select == "auc" and kind.classes_missing(y_val, n_outputs):
        log.warning(
            "val split lacks a class, so val AUC is undefined: selecting on val loss instead"
        )
        select = "loss"

    history: list[dict[str, Any]] = []
    best_value: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_val: dict[str, Any] = {}
    stopped_early = False
    base_lr = float(settings["lr"])
    patience = settings["patience"]
    for epoch in range(1, int(settings["epochs"]) + 1):
        plan = protocol.plan(epoch)
        for group in optimizer.param_groups:
            group["lr"] = base_lr * plan.lr_factor[group["name"]]
        train_loss = _train_epoch(
            model,
            x_train,
            y_train,
            optimizer,
            criterion,
            settings,
            kind,
            plan.train_backbone,
            generator,
            epoch,
        )
        val = evaluate(model, x_val, y_val, kind, settings=settings)
        lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "backbone_trained": plan.train_backbone,
                "lr": lrs,
                **{f"val_{k}": v for k, v in val.items() if k in (*kind.metrics, "loss")},
            }
        )
        log.info(
            "epoch %d: train_loss %.4f lr %s val %s",
            epoch,
            train_loss,
            lrs,
            " ".join(f"{k} {val[k]:.4f}" for k in (*kind.metrics, "loss")),
        )
        fault_point("finetune.epoch_end")
        if _is_better(val[select], best_value, select):
            best_value, best_epoch, best_val = val[select], epoch, val
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif (
            patience is not None
            and best_epoch is not None
            and epoch - best_epoch >= int(patience)
            and epoch >= protocol.earliest_stop()
        ):
            log.info(
                "no better val %s for %d epochs: stopping at epoch %d", select, patience, epoch
            )
            stopped_early = True
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    test = evaluate(model, x_test, y_test, kind, tta=settings["tta"], settings=settings)
    elapsed = time.perf_counter() - started
    log.info(
        "best epoch %s; test %s; %.1f s",
        best_epoch,
        {k: round(test[k], 4) for k in kind.metrics},
        elapsed,
    )

    n_train_patients = partition.loc[partition["index"].isin(train_idx), "patient_id"].nunique()
    run_info = {
        "finetune": settings,
        "task": task,
        "init": init,
        "fraction": fraction,
        "backbone": backbone_name,
        "encoder": None if encoder is None else str(encoder),
        "encoder_sidecar": info,
        "masks": None if masks is None else str(masks),
        "select_metric_used": select,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    metrics = {
        "init": init,
        "task": task["name"],
        "task_type": kind.name,
        "fraction": float(fraction),
        "seed": int(seed),
        "n_train": sizes[0],
        "n_val": sizes[1],
        "n_test": sizes[2],
        "n_train_patients": int(n_train_patients),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "select_metric": select,
        "val": {k: best_val.get(k, math.nan) for k in kind.metrics},
        "test": {k: test[k] for k in kind.metrics},
        "history": history,
        "settings": settings,
        "provenance": record("finetune", run_info, seed),
    }
    if "auc_per_label" in test:
        metrics["test_auc_per_label"] = dict(
            zip(task["columns"], test["auc_per_label"], strict=True)
        )
    return FinetuneResult(metrics=metrics, model=model, backbone=backbone_name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medssl.finetune",
        description="Fine-tune one initialisation on one training subset; write metrics.json.",
    )
    parser.add_argument("--data", required=True, help="converted dataset (.h5)")
    parser.add_argument("--partition", required=True, help="partition CSV (medssl.datasets.splits)")
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
    parser.add_argument(
        "--settings", type=json_arg, default={}, help="config finetune section (JSON)"
    )
    parser.add_argument(
        "--init", required=True, help="initialisation name recorded in metrics.json"
    )
    parser.add_argument("--encoder", help="encoder.pt to start from; omit for scratch")
    parser.add_argument("--masks", help="mask file (medssl.datasets.mask_sources) of a segmentation task")
    parser.add_argument(
        "--backbone",
        choices=sorted(BACKBONES),
        help=f"backbone for scratch runs (default {DEFAULT_BACKBONE}); an encoder's sidecar wins",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--out", required=True, help="metrics.json to write")
    parser.add_argument(
        "--export-encoder",
        help="also save the selected model's backbone as an encoder.pt (supervised "
        "initialisation, e.g. ImageNet then a labelled medical task); one seed only",
    )
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (no file on failure)."""
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    set_threads(args.threads)
    try:
        if not isinstance(args.task, dict) or "type" not in args.task:
            raise ValueError(
                f"--task must be a JSON object with 'name' and 'type', got {args.task!r}"
            )
        if len(args.subsets) != len(args.seed):
            raise ValueError(
                f"{len(args.seed)} seeds but {len(args.subsets)} --subsets files: "
                "give one subsets file per seed, in the same order"
            )
        if len(set(args.seed)) != len(args.seed):
            raise ValueError(f"--seed lists a seed twice: {args.seed}")
        if args.export_encoder and len(args.seed) != 1:
            raise ValueError("--export-encoder takes one --seed: the run whose backbone it saves")
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
                device=resolve_device(args.device),
                masks=args.masks,
            )
            runs.append(result.metrics)
    except (FinetuneError, ValueError, OSError, KeyError) as err:
        log.error("%s: %s", args.out, err)
        return 1
    if args.export_encoder:
        info = {
            "method": f"supervised:{args.task['name']}",
            "init": args.init,
            "start_encoder": args.encoder,
            "task": args.task,
            "best_epoch": runs[0]["best_epoch"],
            "test": runs[0]["test"],
            "provenance": runs[0]["provenance"],
        }
        save_encoder(result.model.backbone, args.export_encoder, result.backbone, info)
        log.info("wrote %s", args.export_encoder)
    # One seed: the run itself; several (compute.seeds_per_job): the list of runs.
    write_json(args.out, runs[0] if len(runs) == 1 else runs)
    log.info("wrote %s (%d run%s)", args.out, len(runs), "" if len(runs) == 1 else "s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
