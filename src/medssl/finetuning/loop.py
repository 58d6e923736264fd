"""Fine-tune one initialisation on one labelled subset and score it on the fixed test split.

One run = one (init, task, fraction, seed) cell of the benchmark; the stage
``python -m medssl.finetune`` runs :func:`finetune` once per seed it is given.
The model is the backbone (random from ``backbone`` when there is no
``encoder``: the scratch baseline) plus what the task type puts on it
(:mod:`medssl.finetuning.tasktypes`: a linear head, or a U-Net decoder for
segmentation, whose masks come from ``masks``). The protocol
(:mod:`medssl.finetuning.protocols`) says per epoch whether the backbone trains
and at what learning rate. Each epoch trains on the subset and scores the
validation split; the state with the best validation ``select_metric``
(earliest on ties) is restored and scored once on the test split (optionally
with test-time augmentation, :mod:`medssl.finetuning.tta`), so the test set
never influences any choice. With ``patience`` the run stops after that many
epochs without a better validation score.

Validation also fixes the decision threshold: each epoch's validation
predictions get the threshold of ``finetune.threshold`` (``youden`` by
default, :mod:`medssl.finetuning.metrics`), its accuracy and F1 are those at
that threshold, and the selected epoch's threshold is applied unchanged to
the test split and recorded (``threshold``). Segmentation selects on the
same per-case Dice that it reports. The test split's outcome is checked for
degenerate answers (a constant score, one predicted class, an empty or full
mask, an undefined metric): each is listed in ``flags`` and logged as a
warning naming the run, so a model that answers the same thing for every
image cannot pass for a result. The test predictions themselves
(:attr:`FinetuneResult.predictions`) go to the predictions file beside
metrics.json (format in :mod:`medssl.finetuning.metrics`).

:func:`finetune` is four named steps: :func:`prepare_run` (settings, data,
model, optimiser), :func:`fit` (epochs with early stopping), :func:`score_test`
(the selected state on the test split) and :func:`metrics_record` (the
metrics.json payload).

The run is deterministic on CPU for a given seed: the seed drives the head
(and scratch backbone) initialisation, batch order and augmentation. A run
whose loss or scores become NaN/inf stops with an error and writes nothing, so
a diverged run can never enter the tables as a number.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medssl.core.directions import HIGHER_IS_BETTER
from medssl.core.faults import fault_point
from medssl.core.provenance import record
from medssl.core.registry import Registry, UnknownNameError, look_up
from medssl.core.seeding import seed_everything
from medssl.core.task_types import TASK_TYPES as TASK_TYPE_SPECS
from medssl.datasets.maskfile import load_masks
from medssl.datasets.splits import TARGETS_COLUMN, parse_targets, select_training
from medssl.finetuning.lr_decay import (
    DEFAULT_LAYER_DECAY,
    check_layer_decay,
    param_groups_with_decay,
)
from medssl.finetuning.metrics import (
    EMPTY_REFERENCE_RULES,
    OverlapCounts,
    check_threshold_setting,
    metric_definitions,
    overlap_counts,
)
from medssl.finetuning.protocols import (
    PROTOCOL_SETTING_DEFAULTS,
    PROTOCOLS,
    Protocol,
    make_protocol,
)
from medssl.finetuning.streaming import DEFAULT_BUDGET_GB, JobData, RowSource
from medssl.finetuning.tasktypes import (
    SEG_LOSSES,
    TASK_TYPES,
    EvalRows,
    TaskType,
    Threshold,
    task_type,
)
from medssl.finetuning.tta import TTA_MODES, predict_with_tta
from medssl.models.backbones import build_backbone, load_encoder, save_encoder

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
    "threshold": "youden",
    "empty_reference": "exclude",
    "memory_budget_gb": DEFAULT_BUDGET_GB,
    "layer_decay": DEFAULT_LAYER_DECAY,
    **PROTOCOL_SETTING_DEFAULTS,
}
"""The ``finetune`` config section's defaults: the code's one source (the schema's
defaults are kept equal by a test)."""

OptimizerFactory = Callable[[list[dict[str, Any]], float, float], torch.optim.Optimizer]
"""``(parameter groups, lr, weight decay) -> optimiser``."""

OPTIMIZERS: Registry[OptimizerFactory] = Registry(
    "fine-tuning optimizer",
    {
        "adam": lambda groups, lr, decay: torch.optim.Adam(groups, lr=lr, weight_decay=decay),
        "adamw": lambda groups, lr, decay: torch.optim.AdamW(groups, lr=lr, weight_decay=decay),
        "sgd": lambda groups, lr, decay: torch.optim.SGD(
            groups, lr=lr, weight_decay=decay, momentum=0.9
        ),
    },
)
"""``finetune.optimizer``: the optimisers by name."""

CLASS_WEIGHTS: Registry[bool] = Registry("class weighting", {"balanced": True, "none": False})
"""``finetune.class_weights``: whether the loss weighs classes by the training subset's counts."""

SELECT_METRICS: tuple[str, ...] = (
    "auto",
    *dict.fromkeys(metric for spec in TASK_TYPE_SPECS.values() for metric in spec.metrics),
    "loss",
)
"""What ``select_metric`` may name: ``auto`` (the task's metric), any task type's metric, loss."""

CHOICES: dict[str, Collection[str]] = {
    "protocol": PROTOCOLS,
    "optimizer": OPTIMIZERS,
    "select_metric": SELECT_METRICS,
    "tta": TTA_MODES,
    "seg_loss": SEG_LOSSES,
    "class_weights": CLASS_WEIGHTS,
    "empty_reference": EMPTY_REFERENCE_RULES,
}
"""The settings that name something, and the names each may take (``threshold`` names a
rule or is a number: :func:`medssl.finetuning.metrics.check_threshold_setting`)."""

DEFAULT_BACKBONE = "resnet_small"
EVAL_BATCH = 256
SHIFT_FRACTION = 1 / 16
"""Largest random shift as a fraction of the image side (4 pixels at 64x64)."""


FLAG_MEANINGS: dict[str, str] = {
    "constant_prediction": "every test score is the same",
    "single_class_predicted": "every test prediction is the same class",
    "empty_prediction": "no foreground predicted on any test slice",
    "full_prediction": "foreground predicted on every test pixel",
    "undefined_metric": "a metric is undefined",
}
"""What each flag of metrics.json means, for the warning that names the run."""


class FinetuneError(RuntimeError):
    """A run that cannot produce trustworthy metrics (divergence, unusable inputs)."""


def resolve_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """The config ``finetune`` section with defaults filled in and values checked.

    Unknown keys are errors: a misspelt setting silently replaced by its
    default would make a whole sweep measure the wrong thing. A value naming
    something unknown raises :class:`~medssl.core.registry.UnknownNameError`.
    """
    given = dict(settings or {})
    unknown = sorted(set(given) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(
            f"finetune settings: unknown key(s) {unknown}; allowed {sorted(DEFAULT_SETTINGS)}"
        )
    resolved = {**DEFAULT_SETTINGS, **given}
    for key, options in CHOICES.items():
        look_up(f"finetune.{key}", resolved[key], options)
    resolved["threshold"] = check_threshold_setting(resolved["threshold"])
    _check_numbers(resolved)
    return resolved


def _check_numbers(settings: dict[str, Any]) -> None:
    """The ranges the schema also states, checked again for callers that skip the config."""
    if int(settings["epochs"]) < 1 or int(settings["batch_size"]) < 1:
        raise ValueError("finetune settings: epochs and batch_size must be at least 1")
    if not float(settings["lr"]) > 0 or float(settings["weight_decay"]) < 0:
        raise ValueError("finetune settings: lr must be > 0 and weight_decay >= 0")
    if settings["patience"] is not None and int(settings["patience"]) < 1:
        raise ValueError("finetune settings: patience must be at least 1, or null for none")
    if not float(settings["memory_budget_gb"]) > 0 or int(settings["num_workers"]) < 0:
        raise ValueError("finetune settings: memory_budget_gb must be > 0 and num_workers >= 0")
    check_layer_decay(float(settings["layer_decay"]))
    if int(settings["freeze_epochs"]) < 0:
        raise ValueError("finetune settings: freeze_epochs must be >= 0")
    if (
        not 0 < float(settings["unfreeze_lr_factor"]) <= 1
        or float(settings["unfreeze_lr_growth"]) < 1
    ):
        raise ValueError(
            "finetune settings: unfreeze_lr_factor must be in (0, 1] and unfreeze_lr_growth >= 1"
        )


def check_task(task: object) -> TaskType:
    """The task type of ``task`` (a JSON object with ``name`` and ``type``), its fields checked.

    A type whose labels span several columns needs ``columns``: without them
    the bits of a partition's label code have no names.
    """
    if not isinstance(task, dict) or not task.get("name") or "type" not in task:
        raise ValueError(f"task must be a JSON object with 'name' and 'type', got {task!r}")
    kind = task_type(task["type"])
    if kind.spec.multiple_columns and not task.get("columns"):
        raise ValueError(f"{kind.name} task {task['name']!r} needs 'columns'")
    return kind


def select_metric_for(settings: dict[str, Any], task: dict[str, Any], kind: TaskType) -> str:
    """The validation metric that picks the epoch: ``auto`` is the task's own ``metric``."""
    select = settings["select_metric"]
    if select == "auto":
        select = task.get("metric") or kind.metrics[0]
    try:
        return look_up(f"{kind.name} metric", select, (*kind.metrics, "loss"))
    except UnknownNameError as err:
        raise UnknownNameError(f"task {task.get('name')!r}: select_metric: {err}") from None


@dataclass
class FinetuneResult:
    """What a run produced: the metrics.json payload and the selected model."""

    metrics: dict[str, Any]
    model: nn.Module
    backbone: str = DEFAULT_BACKBONE
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    """The test predictions file's arrays (:mod:`medssl.finetuning.metrics`)."""


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
    criterion = TASK_TYPES[task_type].criterion(DEFAULT_SETTINGS, labels, n_outputs)
    weight = getattr(criterion, "pos_weight", None)
    return weight if weight is not None else criterion.weight


def _param_groups(
    model: nn.Module, protocol: Protocol, settings: dict[str, Any]
) -> list[dict[str, Any]]:
    """Optimiser groups named by part (``backbone``, ``head``) so the protocol can set each
    part's lr; with ``layer_decay`` < 1 one group per layer, each with its ``lr_scale``."""
    return param_groups_with_decay(
        model.backbone if protocol.trains_backbone_ever() else None,
        model.head,
        float(settings["lr"]),
        float(settings["weight_decay"]),
        float(settings["layer_decay"]),
    )


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, kind: TaskType, tta: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of ``model`` on ``images`` (eval mode) and the logits of the plain images.

    The logits give the loss; a mode that only predicts the plain images
    reuses them instead of a second forward pass.
    """
    model.eval()
    logits = torch.cat([model(chunk) for chunk in torch.split(images, EVAL_BATCH)])
    if not torch.isfinite(logits).all():
        raise FinetuneError("model outputs are NaN/inf: the run diverged")
    if not TTA_MODES[tta].augments:
        return kind.probabilities(logits), logits

    def probabilities(views: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [kind.probabilities(model(chunk)) for chunk in torch.split(views, EVAL_BATCH)]
        )

    return predict_with_tta(probabilities, images, tta, kind.dense), logits


@dataclass
class Evaluation:
    """One split scored: metrics (the type's, its detail, and ``loss``), the threshold used,
    the flags of a degenerate outcome and the arrays of the predictions file."""

    metrics: dict[str, Any]
    threshold: Threshold
    flags: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate(
    model: nn.Module,
    images: torch.Tensor | RowSource,
    targets: torch.Tensor | None,
    kind: TaskType | str,
    tta: str = "none",
    settings: dict[str, Any] | None = None,
    *,
    rows: EvalRows,
    threshold: Threshold | None = None,
) -> Evaluation:
    """Metrics and mean (unweighted) loss of ``model`` on one split.

    ``images`` is the split's model input, or its
    :mod:`~medssl.finetuning.streaming` source, read in batches of
    :data:`EVAL_BATCH`; ``targets`` are its labels (None for segmentation,
    whose masks come with a source's batches). ``threshold`` None chooses it
    on these predictions (validation: the ``finetune.threshold`` rule); the
    test split is given the selected epoch's. ``rows`` name the split's
    samples and patients.
    """
    kind = task_type(kind) if isinstance(kind, str) else kind
    settings = resolve_settings(settings)
    if isinstance(images, torch.Tensor):
        probs, logits = predict(model, images, kind, tta)
    elif kind.dense and not images.held:
        return _evaluate_counts(model, images, kind, tta, settings, rows, threshold)
    else:
        probs, logits, masks = _predict_source(model, images, kind, tta)
        targets = masks if kind.dense else targets
    return _score(kind, settings, probs, logits, targets, rows, threshold)


def _eval_chunks(n: int) -> list[torch.Tensor]:
    """Positions of a split in the consecutive batches the whole-tensor path scores."""
    return list(torch.split(torch.arange(n), EVAL_BATCH))


def _predict_source(
    model: nn.Module, source: RowSource, kind: TaskType, tta: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Probabilities, logits (and masks) of a source's split, batch by batch.

    The batches are :data:`EVAL_BATCH` consecutive rows, as :func:`predict`
    cuts a tensor, and every step of a prediction (and of each TTA view) is
    per image, so the results equal the whole-tensor path's.
    """
    probs, logits, masks = [], [], []
    for _, x, batch_masks in source.batches(_eval_chunks(len(source))):
        batch_probs, batch_logits = predict(model, x, kind, tta)
        probs.append(batch_probs)
        logits.append(batch_logits)
        masks.append(batch_masks)
    return torch.cat(probs), torch.cat(logits), torch.cat(masks) if kind.dense else None


def _score(
    kind: TaskType,
    settings: dict[str, Any],
    probs: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    rows: EvalRows,
    threshold: Threshold | None,
) -> Evaluation:
    """The split's loss, threshold and the task type's assessment, from all its outputs."""
    criterion = kind.criterion(settings, None, int(logits.shape[1]))
    with torch.no_grad():
        loss = float(kind.loss(criterion, logits, targets))
    if not math.isfinite(loss):
        raise FinetuneError(f"validation loss is {loss}: the run diverged")
    if threshold is None:
        threshold = kind.choose_threshold(targets, probs, settings)
    outcome = kind.assess(targets, probs, threshold, rows, settings)
    return Evaluation({**outcome.metrics, "loss": loss}, threshold, outcome.flags, outcome.arrays)


def _evaluate_counts(
    model: nn.Module,
    source: RowSource,
    kind: TaskType,
    tta: str,
    settings: dict[str, Any],
    rows: EvalRows,
    threshold: Threshold | None,
) -> Evaluation:
    """A streamed segmentation split scored from per-slice overlap counts, never whole maps.

    Per-case Dice needs only each slice's intersection and foreground sums
    (:func:`~medssl.finetuning.metrics.overlap_counts`), the constant-output
    flag only the extreme probabilities, and the loss (per-slice soft Dice,
    per-pixel BCE: means over equal-sized slices) is the size-weighted mean
    of the batch losses. The metrics, flags and arrays are those of
    :meth:`~medssl.finetuning.tasktypes.Segmentation.assess`.
    """
    if threshold is None:  # a fixed pixel cut: it does not depend on the predictions
        threshold = kind.choose_threshold(torch.empty(0), torch.empty(0), settings)
    criterion = kind.criterion(settings, None, 1)
    total, low, high, parts = 0.0, math.inf, -math.inf, []
    for _, x, masks in source.batches(_eval_chunks(len(source))):
        probs, logits = predict(model, x, kind, tta)
        with torch.no_grad():
            total += float(kind.loss(criterion, logits, masks)) * len(x)
        probs = probs.detach().cpu()
        parts.append(overlap_counts(masks[:, 0].cpu(), probs, float(threshold.value)))
        low, high = min(low, float(probs.min())), max(high, float(probs.max()))
    loss = total / len(source)
    if not math.isfinite(loss):
        raise FinetuneError(f"validation loss is {loss}: the run diverged")
    counts = OverlapCounts(
        *(np.concatenate([getattr(p, name) for p in parts]) for name in COUNT_FIELDS),
        pixels_per_slice=parts[0].pixels_per_slice,
    )
    # The spread of two values [min, max] is the spread of every probability.
    scored = kind.assess_counts(counts, torch.tensor([low, high]), rows, settings)
    return Evaluation({**scored.metrics, "loss": loss}, threshold, scored.flags, scored.arrays)


COUNT_FIELDS = ("intersection", "pred_sum", "ref_sum")


def _is_better(value: float, best: float | None, metric: str) -> bool:
    """Strictly better (ties keep the earlier epoch); NaN never wins."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if HIGHER_IS_BETTER[metric] else value < best


def _split_rows(partition: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows of one fixed split in file order; an empty split cannot score anything."""
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
    if kind.spec.labels_from_masks:
        if masks is None:
            raise FinetuneError(f"a {kind.name} task needs --masks (the medssl.masks output)")
        return torch.from_numpy(load_masks(masks, every)).unsqueeze(1).float().to(device)
    by_row = partition.set_index("index")
    if TARGETS_COLUMN in by_row.columns:
        # Per-label values (uncertain labels left out as -1, soft labels): see splits.
        values = parse_targets(by_row[TARGETS_COLUMN].loc[every], n_outputs)
        return torch.from_numpy(values).float().to(device)
    codes = torch.as_tensor(by_row["label"].loc[every].to_numpy(copy=True), dtype=torch.int64)
    return kind.targets(codes, n_outputs).to(device)


@dataclass
class SplitData:
    """The three splits of a run: their images (held or streamed) and label targets.

    Segmentation has no label targets (``y_*`` None): its masks come with
    each batch of the split's source.
    """

    train_idx: np.ndarray
    """Partition rows of the training subset (the fraction's patients)."""
    n_train_patients: int
    n_outputs: int
    channels: int
    train: RowSource
    val: RowSource
    test: RowSource
    y_train: torch.Tensor | None
    y_val: torch.Tensor | None
    y_test: torch.Tensor | None
    val_rows: EvalRows
    test_rows: EvalRows

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Slices in the train, val and test splits."""
        return len(self.train), len(self.val), len(self.test)

    @property
    def x_train(self) -> torch.Tensor:
        """The training subset as one float tensor (a held split only: small data, tests)."""
        return self.train.model_input()

    @property
    def x_val(self) -> torch.Tensor:
        """The validation split as one float tensor (a held split only)."""
        return self.val.model_input()

    @property
    def x_test(self) -> torch.Tensor:
        """The test split as one float tensor (a held split only)."""
        return self.test.model_input()


def job_data(
    data: str | Path,
    masks: str | Path | None,
    task: dict[str, Any],
    settings: dict[str, Any] | None,
    device: str | torch.device = "cpu",
    mode: str = "auto",
) -> JobData:
    """The data of a job's runs on ``data``: one loader, and the fixed splits read once.

    Every seed of a job passes the same one to :func:`finetune`; the mask
    file is opened only for a task whose labels are masks. ``mode``
    (:data:`~medssl.finetuning.streaming.DATA_MODES`) forces a plan instead
    of choosing it by ``memory_budget_gb``.
    """
    settings = resolve_settings(settings)
    kind = check_task(task)
    return JobData(
        data,
        masks if kind.spec.labels_from_masks else None,
        torch.device(device),
        float(settings["memory_budget_gb"]),
        int(settings["num_workers"]),
        mode,
    )


def load_splits(
    data: str | Path,
    partition: pd.DataFrame,
    subsets: pd.DataFrame,
    fraction: float,
    task: dict[str, Any],
    kind: TaskType,
    protocol: Protocol,
    masks: str | Path | None,
    device: torch.device,
    job: JobData | None = None,
    batch_size: int = DEFAULT_SETTINGS["batch_size"],
) -> SplitData:
    """The training subset of ``fraction`` and the fixed val and test splits, ready to batch.

    ``job`` (:func:`job_data`) decides within its memory budget which splits
    are held in memory and which are streamed; only the rows of the three
    splits are ever read. Without one, a job of default settings is made.
    """
    train_idx = select_training(partition, subsets, fraction)
    val_rows, test_rows = _split_rows(partition, "val"), _split_rows(partition, "test")
    n_codes = int(partition["label"].max()) + 1
    problem = kind.codes_problem(task, n_codes)
    if problem is not None:
        raise FinetuneError(problem)
    if protocol.trains_backbone_ever() and len(train_idx) < 2:
        raise FinetuneError(
            f"protocol {protocol.name} needs at least 2 training slices (BatchNorm)"
        )
    n_outputs = kind.n_outputs(task, n_codes)
    sizes = (len(train_idx), len(val_rows), len(test_rows))
    splits = (train_idx, val_rows["index"].to_numpy(), test_rows["index"].to_numpy())
    if kind.spec.labels_from_masks:
        if masks is None:
            raise FinetuneError(f"a {kind.name} task needs --masks (the medssl.masks output)")
        targets: tuple[torch.Tensor | None, ...] = (None, None, None)
    else:
        every = np.concatenate(splits)
        targets = torch.split(_targets(kind, partition, every, masks, n_outputs, device), sizes)
    job = job or job_data(data, masks, task, None, device)
    sources = job.sources(splits, max(int(batch_size), EVAL_BATCH), kind.dense)
    n_patients = partition.loc[partition["index"].isin(train_idx), "patient_id"].nunique()
    return SplitData(
        train_idx,
        int(n_patients),
        n_outputs,
        job.layout.shape[0],
        *sources,
        *targets,
        _eval_rows(val_rows),
        _eval_rows(test_rows),
    )


def _eval_rows(rows: pd.DataFrame) -> EvalRows:
    """HDF5 rows and patient ids of one split (a segmentation case is one patient)."""
    return EvalRows(
        rows["index"].to_numpy(dtype=np.int64),
        rows["patient_id"].astype(str).to_numpy(dtype=str),
    )


@dataclass
class PreparedRun:
    """One fine-tuning, ready to train: what it is, its data, model and optimiser."""

    init: str
    task: dict[str, Any]
    fraction: float
    seed: int
    settings: dict[str, Any]
    kind: TaskType
    select: str
    """The validation metric that picks the epoch (``loss`` when the val AUC is undefined)."""
    protocol: Protocol
    device: torch.device
    generator: torch.Generator
    data: SplitData
    model: nn.Module
    backbone: str
    encoder: str | Path | None
    encoder_info: dict | None
    masks: str | Path | None
    optimizer: torch.optim.Optimizer
    criterion: nn.Module


def prepare_run(
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
    job: JobData | None = None,
) -> PreparedRun:
    """Check the settings and task, seed every generator, load the splits, build the model.

    Everything that can be refused is checked before the first random draw;
    the seeding comes before the model is built, because the scratch backbone
    and the head draw from torch's generator. ``job`` (:func:`job_data`) is
    the data shared by the seeds of one job; without one, this run's settings
    make its own.
    """
    settings = resolve_settings(settings)
    kind = check_task(task)
    select = select_metric_for(settings, task, kind)
    protocol = make_protocol(settings)
    device = torch.device(device)
    generator = seed_everything(seed)
    job = job or job_data(data, masks, task, settings, device)
    split = load_splits(
        data,
        partition,
        subsets,
        fraction,
        task,
        kind,
        protocol,
        masks,
        device,
        job,
        int(settings["batch_size"]),
    )
    model, backbone_name, info = build_model(
        kind.name, split.n_outputs, split.channels, encoder, backbone, settings
    )
    model.to(device=device, memory_format=torch.channels_last)
    optimizer = OPTIMIZERS[settings["optimizer"]](
        _param_groups(model, protocol, settings),
        float(settings["lr"]),
        float(settings["weight_decay"]),
    )
    weights = split.y_train if CLASS_WEIGHTS[settings["class_weights"]] else None
    criterion = kind.criterion(settings, weights, split.n_outputs)
    if select == "auc" and kind.classes_missing(split.y_val, split.n_outputs):
        log.warning(
            "val split lacks a class, so val AUC is undefined: selecting on val loss instead"
        )
        select = "loss"
    return PreparedRun(
        init=init,
        task=task,
        fraction=fraction,
        seed=seed,
        settings=settings,
        kind=kind,
        select=select,
        protocol=protocol,
        device=device,
        generator=generator,
        data=split,
        model=model,
        backbone=backbone_name,
        encoder=encoder,
        encoder_info=info,
        masks=masks,
        optimizer=optimizer,
        criterion=criterion,
    )


def _train_epoch(run: PreparedRun, train_backbone: bool, epoch: int) -> float:
    """One pass over the training subset; returns the sample-weighted mean loss."""
    model, settings, kind, generator = run.model, run.settings, run.kind, run.generator
    targets = run.data.y_train
    model.train()
    model.backbone.requires_grad_(train_backbone)
    if not train_backbone:
        # Frozen means frozen: BatchNorm must not update its running statistics either.
        model.backbone.eval()
    # The order and the augmentation are drawn here, never in a loader worker, so a
    # held and a streamed training subset see the same batches for one seed.
    order = torch.randperm(len(run.data.train), generator=generator)
    batches = _batches(order, int(settings["batch_size"]))
    total, seen = 0.0, 0
    for batch, x, masks in run.data.train.batches(batches):
        y = masks if kind.dense else targets[torch.from_numpy(batch).to(targets.device)]
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
        loss = kind.loss(run.criterion, logits, y)
        if not torch.isfinite(loss):
            raise FinetuneError(
                f"epoch {epoch}: training loss is {float(loss.detach())}; the run diverged "
                f"(lr={settings['lr']}, optimizer={settings['optimizer']})"
            )
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        total += float(loss.detach()) * len(batch)
        seen += len(batch)
    return total / seen


@dataclass
class FitResult:
    """What training produced: the epochs' history and the best validation epoch's state."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_value: float | None = None
    best_val: dict[str, Any] = field(default_factory=dict)
    best_threshold: Threshold | None = None
    """The decision threshold chosen on the best epoch's validation predictions."""
    best_state: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False


def _should_stop(run: PreparedRun, fitted: FitResult, epoch: int) -> bool:
    """Patience used up, and the protocol allows stopping this early."""
    patience = run.settings["patience"]
    return (
        patience is not None
        and fitted.best_epoch is not None
        and epoch - fitted.best_epoch >= int(patience)
        and epoch >= run.protocol.earliest_stop()
    )


def _group_key(group: dict[str, Any], per_layer: bool) -> str:
    return f"{group['name']}/layer{group['layer_id']}" if per_layer else group["name"]


def _training_batches(run: PreparedRun) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training subset as ``(model input, targets)`` batches in row order, read lazily."""
    positions = _batches(torch.arange(len(run.data.train)), EVAL_BATCH)
    targets = run.data.y_train
    for where, x, _ in run.data.train.batches(positions):
        yield x, targets[torch.from_numpy(where).to(targets.device)]


def _evaluate_val(run: PreparedRun) -> Evaluation:
    """The run's model scored on the validation split (metrics, threshold, flags)."""
    return evaluate(
        run.model,
        run.data.val,
        run.data.y_val,
        run.kind,
        settings=run.settings,
        rows=run.data.val_rows,
    )


def fit(run: PreparedRun) -> FitResult:
    """Train epoch by epoch, scoring the validation split; keep the best state, stop on patience.

    A protocol that trains nothing (``knn``) hands back the model that answers
    instead, built from the training batches; it is scored once on validation.
    """
    answer = run.protocol.model_from_batches(
        run.model, _training_batches(run), run.kind.name, run.data.n_outputs
    )
    if answer is not None:
        run.model = answer
        val = _evaluate_val(run)
        log.info("%s: nothing trained; val %s", run.protocol.name, val.metrics.get(run.select))
        return FitResult(best_val=val.metrics, best_threshold=val.threshold)
    fitted = FitResult()
    base_lr = float(run.settings["lr"])
    metrics = (*run.kind.metrics, "loss")
    per_layer = float(run.settings["layer_decay"]) != 1.0
    for epoch in range(1, run.protocol.planned_epochs() + 1):
        plan = run.protocol.plan(epoch)
        for group in run.optimizer.param_groups:
            scale = group.get("lr_scale", 1.0)
            group["lr"] = base_lr * scale * plan.lr_factor[group["name"]]
        train_loss = _train_epoch(run, plan.train_backbone, epoch)
        evaluation = _evaluate_val(run)
        val = evaluation.metrics
        lrs = {_group_key(g, per_layer): g["lr"] for g in run.optimizer.param_groups}
        fitted.history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "backbone_trained": plan.train_backbone,
                "lr": lrs,
                **{f"val_{k}": v for k, v in val.items() if k in metrics},
            }
        )
        log.info(
            "epoch %d: train_loss %.4f lr %s val %s",
            epoch,
            train_loss,
            lrs,
            " ".join(f"{k} {val[k]:.4f}" for k in metrics),
        )
        fault_point("finetune.epoch_end")
        if _is_better(val[run.select], fitted.best_value, run.select):
            fitted.best_value, fitted.best_epoch, fitted.best_val = val[run.select], epoch, val
            fitted.best_threshold = evaluation.threshold
            fitted.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        elif _should_stop(run, fitted, epoch):
            log.info(
                "no better val %s for %d epochs: stopping at epoch %d",
                run.select,
                run.settings["patience"],
                epoch,
            )
            fitted.stopped_early = True
            break
    return fitted


def score_test(run: PreparedRun, fitted: FitResult) -> Evaluation:
    """Restore the selected epoch's state and score it once on the test split (with TTA).

    The test split is cut at the selected epoch's validation threshold. When
    no epoch was ever selected (every validation score undefined), the last
    state is tested at the threshold of its own validation predictions.
    """
    if fitted.best_state is not None:
        run.model.load_state_dict(fitted.best_state)
    threshold = fitted.best_threshold
    if threshold is None:
        threshold = _evaluate_val(run).threshold
    return evaluate(
        run.model,
        run.data.test,
        run.data.y_test,
        run.kind,
        tta=run.settings["tta"],
        settings=run.settings,
        rows=run.data.test_rows,
        threshold=threshold,
    )


def run_flags(test: Evaluation) -> list[str]:
    """The degenerate-outcome flags of a run: its test split's, and an undefined threshold."""
    flags = list(test.flags)
    if test.threshold.undefined:
        flags.append("undefined_metric:threshold")
    return flags


def pretrain_seed(encoder_info: dict | None) -> int | None:
    """The seed of the training that produced the start encoder, from its sidecar's provenance.

    A pre-training (and a supervised initialisation, whose training is a
    fine-tune) records its seed there; scratch has no encoder and an imported
    checkpoint was trained elsewhere with a seed nobody recorded, so both are None.
    """
    if not encoder_info or str(encoder_info.get("method", "")).startswith("import:"):
        return None
    provenance = encoder_info.get("provenance")
    seed = provenance.get("seed") if isinstance(provenance, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def metrics_record(run: PreparedRun, fitted: FitResult, test: Evaluation) -> dict[str, Any]:
    """The metrics.json payload of one run: counts, selection, val and test scores, threshold,
    flags, metric definitions, provenance."""
    kind, sizes = run.kind, run.data.sizes
    run_info = {
        "finetune": run.settings,
        "task": run.task,
        "init": run.init,
        "fraction": run.fraction,
        "backbone": run.backbone,
        "encoder": None if run.encoder is None else str(run.encoder),
        "encoder_sidecar": run.encoder_info,
        "masks": None if run.masks is None else str(run.masks),
        "select_metric_used": run.select,
        "device": str(run.device),
        "threads": torch.get_num_threads(),
    }
    return {
        "init": run.init,
        "task": run.task["name"],
        "task_type": kind.name,
        "fraction": float(run.fraction),
        "seed": int(run.seed),
        "n_train": sizes[0],
        "n_val": sizes[1],
        "n_test": sizes[2],
        "n_train_patients": run.data.n_train_patients,
        "best_epoch": fitted.best_epoch,
        "epochs_run": len(fitted.history),
        "stopped_early": fitted.stopped_early,
        "select_metric": run.select,
        "pretrain_seed": pretrain_seed(run.encoder_info),
        "threshold": kind.threshold_record(run.task, test.threshold),
        "threshold_rule": test.threshold.rule,
        "flags": run_flags(test),
        "metric_definitions": metric_definitions(
            (*kind.metrics, *kind.detail_metrics),
            run.settings["threshold"],
            run.settings["empty_reference"],
        ),
        "val": {k: fitted.best_val.get(k, math.nan) for k in kind.metrics},
        "test": {k: test.metrics[k] for k in kind.metrics},
        "history": fitted.history,
        "settings": run.settings,
        "provenance": record("finetune", run_info, run.seed),
        **kind.extra_metrics(run.task, test.metrics),
    }


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
    job: JobData | None = None,
) -> FinetuneResult:
    """Run one fine-tuning and return the metrics.json payload and the selected model.

    ``task`` needs ``name`` and ``type`` (and ``columns`` for multilabel);
    ``settings`` is the config ``finetune`` section (missing keys take
    :data:`DEFAULT_SETTINGS`); ``masks`` is the task's mask file for
    segmentation. ``job`` (:func:`job_data`) shares the file, the loader and
    the held fixed splits between the seeds of one job; without one the run
    makes and closes its own. Raises :class:`FinetuneError` when the run
    diverges; nothing is written here.
    """
    started = time.perf_counter()
    own = job_data(data, masks, task, settings, device) if job is None else None
    try:
        run = prepare_run(
            data,
            partition,
            subsets,
            fraction,
            seed,
            task,
            settings,
            init,
            encoder,
            backbone,
            device,
            masks,
            job=job or own,
        )
        fitted = fit(run)
        test = score_test(run, fitted)
    finally:
        if own is not None:
            own.close()
    log.info(
        "best epoch %s; threshold %s; test %s; %.1f s",
        fitted.best_epoch,
        run.kind.threshold_record(run.task, test.threshold),
        {k: round(test.metrics[k], 4) for k in run.kind.metrics},
        time.perf_counter() - started,
    )
    metrics = metrics_record(run, fitted, test)
    name = f"{init}/{task['name']}/frac{fraction}/seed{seed}"
    for flag in metrics["flags"]:
        log.warning("run %s: %s", name, FLAG_MEANINGS.get(flag.split(":")[0], flag) + f" ({flag})")
    return FinetuneResult(
        metrics=metrics, model=run.model, backbone=run.backbone, predictions=test.arrays
    )


def export_encoder(
    result: FinetuneResult,
    path: str | Path,
    task: dict[str, Any],
    init: str,
    start_encoder: str | Path | None,
) -> None:
    """Save the selected model's backbone as an encoder: a supervised initialisation.

    The sidecar names the task it learnt, where it started from and its test
    scores, so an init trained with labels is traceable like a pre-trained one.
    """
    info = {
        "method": f"supervised:{task['name']}",
        "init": init,
        "start_encoder": start_encoder,
        "task": task,
        "best_epoch": result.metrics["best_epoch"],
        "test": result.metrics["test"],
        "provenance": result.metrics["provenance"],
    }
    save_encoder(result.model.backbone, path, result.backbone, info)
