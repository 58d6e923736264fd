"""Fine-tune one initialisation on one labelled subset and score it on the fixed test split.

``python -m medssl.finetune --data H5 --partition CSV --subsets CSV --fraction F --seed S
--task JSON --settings JSON --init NAME [--encoder PATH] [--backbone NAME] [--threads N]
[--device auto|cpu|cuda] --out results/finetune/INIT/TASK/fracF/seedS/metrics.json``

One run = one (init, task, fraction, seed) cell of the benchmark. The model is
the backbone (random from ``--backbone`` when there is no ``--encoder``: the
scratch baseline) plus a linear head. Each epoch trains on the subset and
scores the validation split; the state with the best validation
``select_metric`` (earliest on ties) is scored once on the test split, so the
test set never influences any choice.

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
from medssl.data import load_images
from medssl.directions import HIGHER_IS_BETTER
from medssl.faults import fault_point
from medssl.io import write_json
from medssl.metrics import METRICS, classification_metrics
from medssl.models import BACKBONES, build_backbone, feature_dim, load_encoder
from medssl.provenance import record
from medssl.seeding import seed_everything
from medssl.split import read_partition, read_subsets, select_training

log = logging.getLogger(__name__)

DEFAULT_SETTINGS: dict[str, Any] = {
    "protocol": "full",
    "epochs": 10,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 5e-4,
    "optimizer": "adam",
    "select_metric": "auc",
    "augment": True,
    "class_weights": "balanced",
    "num_workers": 0,
}
CHOICES = {
    "protocol": ("full", "linear"),
    "optimizer": ("adam", "adamw", "sgd"),
    "select_metric": ("auc", "accuracy", "f1", "loss"),
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
    return resolved


class Classifier(nn.Module):
    """Backbone (pooled features) followed by one linear layer."""

    def __init__(self, backbone: nn.Module, n_outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim(backbone), n_outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


@dataclass
class FinetuneResult:
    """What a run produced: the metrics.json payload and the selected model."""

    metrics: dict[str, Any]
    model: Classifier


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random left-right flips and small shifts, independently per image.

    Only left-right flips: an up-down flipped axial CT slice (spine above the
    heart) is not an image the model will ever see. Shifts pad by replicating
    the border, because a zero pad is not "background" under every intensity
    policy.
    """
    batch, _, height, width = images.shape
    flip = torch.rand(batch, generator=generator) < 0.5
    out = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
    pad = max(1, round(SHIFT_FRACTION * min(height, width)))
    padded = nn.functional.pad(out, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator).tolist()
    return torch.stack(
        [padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)]
    )


def _batches(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split a permutation into batches, folding a trailing single sample into the last batch.

    BatchNorm in training mode cannot normalise a batch of one when the last
    feature map is 1x1 (small inputs), and dropping the sample would waste a label.
    """
    chunks = list(torch.split(order, size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def _loss_fn(task_type: str, class_weights: torch.Tensor | None = None) -> nn.Module:
    """BCE for binary, cross-entropy for multi-class; optionally class-weighted.

    For binary tasks ``class_weights`` holds one value, the positive-class
    weight; for multi-class tasks one weight per class.
    """
    if task_type == "binary":
        return nn.BCEWithLogitsLoss(pos_weight=class_weights)
    return nn.CrossEntropyLoss(weight=class_weights)


def balanced_class_weights(labels: torch.Tensor, task_type: str, n_outputs: int) -> torch.Tensor:
    """Weights that give every class the same total weight in the training loss.

    Rare positives (a nodule in one slice out of ten) otherwise teach the model
    to answer "negative" at the 0.5 threshold, which leaves F1 at zero however
    well the scores rank. Binary: n_negative / n_positive as BCE's
    ``pos_weight``; multi-class: n / (K * n_k), 0 for a class absent from the
    subset (it contributes no samples anyway).
    """
    if task_type == "binary":
        positives = int(labels.sum())
        negatives = len(labels) - positives
        ratio = negatives / positives if positives else 1.0
        return torch.tensor([ratio], dtype=torch.float32, device=labels.device)
    counts = torch.bincount(labels, minlength=n_outputs).float()
    present = counts > 0
    weights = torch.zeros(n_outputs, dtype=torch.float32, device=labels.device)
    weights[present] = len(labels) / (int(present.sum()) * counts[present])
    return weights


def _loss(criterion: nn.Module, logits: torch.Tensor, labels: torch.Tensor, task_type: str):
    if task_type == "binary":
        return criterion(logits.squeeze(1), labels.float())
    return criterion(logits, labels)


def _optimizer(settings: dict[str, Any], params: list[nn.Parameter]) -> torch.optim.Optimizer:
    lr, decay = float(settings["lr"]), float(settings["weight_decay"])
    if settings["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay)
    if settings["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=decay, momentum=0.9)


@torch.no_grad()
def evaluate(
    model: Classifier, images: torch.Tensor, labels: torch.Tensor, task_type: str
) -> dict[str, float]:
    """Metrics and mean loss of ``model`` on one split (eval mode, no gradients)."""
    model.eval()
    logits = torch.cat([model(chunk) for chunk in torch.split(images, EVAL_BATCH)])
    loss = float(_loss(_loss_fn(task_type), logits, labels, task_type))
    if not torch.isfinite(logits).all() or not math.isfinite(loss):
        raise FinetuneError(f"model outputs are NaN/inf (loss {loss}): the run diverged")
    if task_type == "binary":
        scores = torch.sigmoid(logits.squeeze(1))
    else:
        scores = torch.softmax(logits, dim=1)
    metrics = classification_metrics(task_type, labels.cpu().numpy(), scores.cpu().numpy())
    return {**metrics, "loss": loss}


def _train_epoch(
    model: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    settings: dict[str, Any],
    task_type: str,
    generator: torch.Generator,
    epoch: int,
) -> float:
    """One pass over the training subset; returns the sample-weighted mean loss."""
    weights = None
    if settings["class_weights"] == "balanced":
        weights = balanced_class_weights(labels, task_type, model.head.out_features)
    criterion = _loss_fn(task_type, weights)
    linear = settings["protocol"] == "linear"
    model.train()
    if linear:
        # Frozen means frozen: BatchNorm must not update its running statistics either.
        model.backbone.eval()
    order = torch.randperm(len(images), generator=generator)
    total, seen = 0.0, 0
    for batch in _batches(order, int(settings["batch_size"])):
        x = images[batch.to(images.device)]
        if settings["augment"]:
            x = augment_batch(x, generator)
        y = labels[batch.to(labels.device)]
        if linear:
            with torch.no_grad():
                features = model.backbone(x)
            logits = model.head(features)
        else:
            logits = model(x)
        loss = _loss(criterion, logits, y, task_type)
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
    task_type: str,
    n_classes: int,
    in_channels: int,
    encoder: str | Path | None,
    backbone: str | None,
) -> tuple[Classifier, str, dict | None]:
    """The classifier to fine-tune, the backbone name it uses and the encoder sidecar.

    Call after seeding: the scratch backbone and the head draw from torch's RNG.
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
    n_outputs = 1 if task_type == "binary" else n_classes
    return Classifier(net, n_outputs), name, info


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
) -> FinetuneResult:
    """Run one fine-tuning and return the metrics.json payload and the selected model.

    ``task`` needs ``name`` and ``type``; ``settings`` is the config ``finetune``
    section (missing keys take :data:`DEFAULT_SETTINGS`). Raises
    :class:`FinetuneError` when the run diverges; nothing is written here.
    """
    started = time.perf_counter()
    settings = resolve_settings(settings)
    if not task.get("name") or "type" not in task:
        raise ValueError(f"task must name 'name' and 'type', got {task!r}")
    task_type = task["type"]
    if task_type not in ("binary", "multiclass"):
        raise ValueError(f"task {task.get('name')!r}: type {task_type!r} is not binary|multiclass")
    device = torch.device(device)
    generator = seed_everything(seed)

    train_idx = select_training(partition, subsets, fraction)
    val_rows, test_rows = _split_rows(partition, "val"), _split_rows(partition, "test")
    label_of = partition.set_index("index")["label"]
    n_classes = int(partition["label"].max()) + 1
    if task_type == "binary" and n_classes != 2:
        raise FinetuneError(
            f"binary task {task.get('name')!r} but partition labels are 0..{n_classes - 1}"
        )
    if settings["protocol"] == "full" and len(train_idx) < 2:
        raise FinetuneError("full fine-tuning needs at least 2 training slices (BatchNorm)")

    sizes = (len(train_idx), len(val_rows), len(test_rows))
    every = np.concatenate([train_idx, val_rows["index"].to_numpy(), test_rows["index"].to_numpy()])
    # channels_last runs the small convolutions of these networks ~20 % faster on CPU.
    images = load_images(data, every).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.as_tensor(
        label_of.loc[every].to_numpy(copy=True), dtype=torch.int64, device=device
    )
    x_train, x_val, x_test = torch.split(images, sizes)
    y_train, y_val, y_test = torch.split(labels, sizes)

    model, backbone_name, info = build_model(
        task_type, n_classes, images.shape[1], encoder, backbone
    )
    model.to(device=device, memory_format=torch.channels_last)
    if settings["protocol"] == "linear":
        model.backbone.requires_grad_(False)
        params = list(model.head.parameters())
    else:
        params = list(model.parameters())
    optimizer = _optimizer(settings, params)

    select = settings["select_metric"]
    if select == "auc" and len(torch.unique(y_val)) < n_classes:
        log.warning(
            "val split lacks a class, so val AUC is undefined: selecting on val loss instead"
        )
        select = "loss"

    history: list[dict[str, Any]] = []
    best_value: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_val: dict[str, float] = {}
    for epoch in range(1, int(settings["epochs"]) + 1):
        train_loss = _train_epoch(
            model, x_train, y_train, optimizer, settings, task_type, generator, epoch
        )
        val = evaluate(model, x_val, y_val, task_type)
        history.append(
            {"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()}}
        )
        log.info(
            "epoch %d: train_loss %.4f val %s",
            epoch,
            train_loss,
            " ".join(f"{k} {v:.4f}" for k, v in val.items()),
        )
        if _is_better(val[select], best_value, select):
            best_value, best_epoch, best_val = val[select], epoch, val
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        fault_point("finetune.epoch_end")

    if best_state is not None:
        model.load_state_dict(best_state)
    test = evaluate(model, x_test, y_test, task_type)
    elapsed = time.perf_counter() - started
    log.info(
        "best epoch %s; test %s; %.1f s",
        best_epoch,
        {k: round(test[k], 4) for k in METRICS},
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
        "select_metric_used": select,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    metrics = {
        "init": init,
        "task": task["name"],
        "task_type": task_type,
        "fraction": float(fraction),
        "seed": int(seed),
        "n_train": sizes[0],
        "n_val": sizes[1],
        "n_test": sizes[2],
        "n_train_patients": int(n_train_patients),
        "best_epoch": best_epoch,
        "val": {k: best_val.get(k, math.nan) for k in METRICS},
        "test": {k: test[k] for k in METRICS},
        "history": history,
        "settings": settings,
        "provenance": record("finetune", run_info, seed),
    }
    return FinetuneResult(metrics=metrics, model=model)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medssl.finetune",
        description="Fine-tune one initialisation on one training subset; write metrics.json.",
    )
    parser.add_argument("--data", required=True, help="converted dataset (.h5)")
    parser.add_argument("--partition", required=True, help="partition CSV (medssl.split)")
    parser.add_argument("--subsets", required=True, help="subset ranks CSV (medssl.subsample)")
    parser.add_argument("--fraction", required=True, type=float, help="training fraction in (0, 1]")
    parser.add_argument(
        "--seed", required=True, type=int, help="run seed (init, order, augmentation)"
    )
    parser.add_argument("--task", required=True, type=json_arg, help="task JSON with name and type")
    parser.add_argument(
        "--settings", type=json_arg, default={}, help="config finetune section (JSON)"
    )
    parser.add_argument(
        "--init", required=True, help="initialisation name recorded in metrics.json"
    )
    parser.add_argument("--encoder", help="encoder.pt to start from; omit for scratch")
    parser.add_argument(
        "--backbone",
        choices=sorted(BACKBONES),
        help=f"backbone for scratch runs (default {DEFAULT_BACKBONE}); an encoder's sidecar wins",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--out", required=True, help="metrics.json to write")
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
        result = finetune(
            data=args.data,
            partition=read_partition(args.partition),
            subsets=read_subsets(args.subsets),
            fraction=args.fraction,
            seed=args.seed,
            task=args.task,
            settings=args.settings,
            init=args.init,
            encoder=args.encoder,
            backbone=args.backbone,
            device=resolve_device(args.device),
        )
    except (FinetuneError, ValueError, OSError, KeyError) as err:
        log.error("%s: %s", args.out, err)
        return 1
    write_json(args.out, result.metrics)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
