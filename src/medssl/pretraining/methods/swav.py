"""SwAV (Caron et al., 2020): predict one crop's Sinkhorn cluster codes from another crop."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medssl.pretraining import distributed
from medssl.pretraining.augment import MultiCrop
from medssl.pretraining.methods.base import Method, register
from medssl.pretraining.methods.heads import mlp
from medssl.pretraining.methods.loss_helpers import wide

if TYPE_CHECKING:
    from medssl.pretraining.loop import StepPlan

log = logging.getLogger(__name__)

SMALL_BATCH_QUEUE_LENGTH = 3840
"""The official small-batch queue (facebookresearch/swav, README "Singlenode training" and
scripts/swav_200ep_bs256_pretrain.sh: ``--queue_length 3840 --epoch_queue_starts 15`` for a
global batch of 256); main_swav.py rounds it down to a multiple of the global batch."""


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """SwAV's soft codes: an equipartitioned assignment of N samples to K prototypes.

    ``scores`` (N, K) are prototype similarities. Starting from
    ``Q = exp(scores / epsilon)`` (as K x N, normalised to sum 1), each
    iteration rescales every prototype row to total mass 1/K and then every
    sample column to mass 1/N (Caron et al., 2020, eq. 3 and appendix A.1).
    The result is scaled by N so each sample's codes sum to 1, and returned as
    (N, K). The maximum is subtracted before ``exp``, which the normalisation
    cancels exactly but which keeps ``exp(1 / 0.05)``-sized values finite.
    No gradient flows through the codes; they are targets.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn_knopp needs (N, K) scores, got shape {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 0:
        raise ValueError(f"need epsilon > 0 and iterations >= 0, got {epsilon}, {iterations}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        logits = wide(scores).T / epsilon
        q = torch.exp(logits - logits.max())
        q /= q.sum()
        n_prototypes, n_samples = q.shape
        for _ in range(iterations):
            q /= q.sum(dim=1, keepdim=True) * n_prototypes
            q /= q.sum(dim=0, keepdim=True) * n_samples
        return (q * n_samples).T


def swapped_prediction(
    scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float
) -> torch.Tensor:
    """SwAV's swapped-prediction loss (Caron et al., 2020, eq. 1-2, multi-crop form).

    ``scores[v]`` (N, K) are the prototype similarities of crop ``v``;
    ``codes[i]`` the Sinkhorn codes of crop ``i`` (codes are computed for the
    first ``len(codes)`` crops, the global ones). For each coded crop ``i``
    every other crop ``v`` predicts it::

        l(i, v) = - mean_n sum_k codes[i][n, k] * log softmax(scores[v][n] / t)_k

    averaged over the ``len(scores) - 1`` predicting crops and over the coded
    crops, as in the official implementation.
    """
    if len(codes) < 1 or len(scores) < 2 or len(codes) > len(scores):
        raise ValueError(
            f"swapped_prediction needs >= 2 crops and 1..n_crops codes, "
            f"got {len(scores)} crops and {len(codes)} codes"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with torch.autocast(device_type=scores[0].device.type, enabled=False):
        log_probs = [F.log_softmax(wide(s) / temperature, dim=1) for s in scores]
        total = scores[0].new_zeros((), dtype=torch.float32)
        for i, code in enumerate(codes):
            cross = [-(code * log_probs[v]).sum(dim=1).mean() for v in range(len(scores)) if v != i]
            total = total + torch.stack(cross).mean()
        return total / len(codes)


@register("swav")
class SwAV(Method):
    """Backbone, projection head, L2-normalised prototypes and swapped prediction.

    Defaults are the official recipe: head Linear(d, 2048) - BN - ReLU -
    Linear(2048, 128), 3,000 prototypes, temperature 0.1, Sinkhorn epsilon
    0.05 with 3 iterations, 2 global + 6 local crops (local crops 96/224 of
    the size, area 0.05-0.14; global area 0.14-1), codes computed for the two
    global crops. Freezing and queue follow the official small-batch recipe
    (batch 256: ``--freeze_prototypes_niters 5005``, one ImageNet epoch,
    ``--queue_length 3840 --epoch_queue_starts 15``), in epochs so that they
    scale to any pool: prototypes frozen for ``freeze_prototypes_epochs`` 1
    (``freeze_prototypes_iters``, when set, counts optimiser steps instead, as
    the official flag does), and ``queue_length`` null, resolved per run by
    :meth:`fit_to_run`.

    * Prototypes are re-normalised to unit length after every optimiser step
      (and at construction), so scores are cosine similarities.
    * While frozen, the prototypes enter the loss detached: they get no
      gradient, so no optimiser (momentum, weight decay) moves them, which is
      what zeroing their gradient does in the official code.
    * Queue (``queue_length`` > 0): from epoch ``queue_start_epoch`` the
      embeddings of the global crops of past batches are kept per global
      crop; once full, their scores join the batch's before Sinkhorn, so
      the equipartition constraint is enforced over more samples than a
      small batch holds. The official code uses 3,840 for batches of 256.
    * Under DDP, Sinkhorn runs over the global batch (the official code
      all-reduces its sums) and the queue holds every rank's embeddings, so
      ``queue_length`` is the global queue, as the official per-rank queues
      of ``queue_length / world_size`` add up to.
    """

    default_settings: ClassVar[dict[str, Any]] = {
        "hidden_dim": 2048,
        "proj_dim": 128,
        "n_prototypes": 3000,
        "temperature": 0.1,
        "epsilon": 0.05,
        "sinkhorn_iterations": 3,
        # facebookresearch/swav README / scripts/swav_*_bs256_pretrain.sh:
        # --freeze_prototypes_niters 5005 = one epoch of ImageNet at batch 256.
        "freeze_prototypes_epochs": 1,
        # main_swav.py --freeze_prototypes_niters (steps); null: use the epochs above.
        "freeze_prototypes_iters": None,
        "n_global_crops": 2,
        "n_local_crops": 6,
        "local_size": 96 / 224,
        "global_crop_scale": [0.14, 1.0],
        "local_crop_scale": [0.05, 0.14],
        # null: SMALL_BATCH_QUEUE_LENGTH fitted to the run (fit_to_run); 0: no queue.
        "queue_length": None,
        # main_swav.py / README: --epoch_queue_starts 15.
        "queue_start_epoch": 15,
    }
    # facebookresearch/swav (800-epoch, batch 4096 recipe): LARC over SGD,
    # lr 4.8 = 0.3 x batch/256, weight decay 1e-6, 10 warm-up epochs, cosine
    # down to final_lr 0.0048 = 0.001 of the peak.
    optim_recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "lars",
        "lr": 0.3,
        "lr_scaling": "linear",
        "weight_decay": 1e-6,
        "momentum": 0.9,
        "warmup_epochs": 10,
        "final_lr_fraction": 0.001,
    }
    # LARC decays and adapts every parameter, biases and BatchNorm included.
    exclude_bias_and_norm: ClassVar[bool] = False
    # The prototypes get no gradient while frozen.
    ddp_find_unused_parameters: ClassVar[bool] = True

    def __init__(self, backbone: nn.Module, settings: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, settings)
        s = self.settings
        dim = int(s["proj_dim"])
        if int(s["n_global_crops"]) < 2:
            raise ValueError(f"swav.n_global_crops must be at least 2, got {s['n_global_crops']}")
        self.projector = mlp([self.feature_dim, int(s["hidden_dim"]), dim], batch_norm=True)
        self.prototypes = nn.Linear(dim, int(s["n_prototypes"]), bias=False)
        self.normalize_prototypes()
        # Built without a run (tests, benchmarks), a null queue length means no queue.
        queue_length = int(s["queue_length"] or 0)
        if queue_length < 0:
            raise ValueError(f"swav.queue_length must be >= 0, got {queue_length}")
        if int(s["freeze_prototypes_epochs"]) < 0:
            raise ValueError(
                f"swav.freeze_prototypes_epochs must be >= 0, got {s['freeze_prototypes_epochs']}"
            )
        self.register_buffer("queue", torch.zeros(int(s["n_global_crops"]), queue_length, dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.queue_active = False
        self.epoch = 0
        """The 0-based epoch under way, set by :meth:`on_epoch_start` (also after a resume)."""

    @classmethod
    def fit_to_run(cls, settings: Mapping[str, Any], plan: StepPlan) -> dict[str, Any]:
        """A null ``queue_length`` becomes the official small-batch queue fitted to the run.

        That is 3,840 embeddings, at most one epoch of the pool (a longer
        queue would hold a slice's embeddings more than once, the older ones
        stale), rounded down to a multiple of the global batch as
        main_swav.py does. When the run ends before ``queue_start_epoch`` or
        before that queue could be full, there is no queue, and the log says why.
        """
        fitted = dict(settings)
        if fitted["queue_length"] is not None:
            length = int(fitted["queue_length"])
            if 0 < length < plan.batch_size:
                raise ValueError(
                    f"swav.queue_length {length} is shorter than the global batch "
                    f"{plan.batch_size}; raise it or set 0 for no queue"
                )
            return fitted
        batch, start = plan.batch_size, int(fitted["queue_start_epoch"])
        epoch_size = plan.steps_per_epoch * batch
        length = min(SMALL_BATCH_QUEUE_LENGTH, epoch_size) // batch * batch
        used = queue_steps_used(length, batch, start, plan)
        if plan.epochs <= start:
            log.info(
                "swav: no queue: the run's %d epochs end before queue_start_epoch %d",
                plan.epochs,
                start,
            )
            length = 0
        elif length == 0:
            log.info(
                "swav: no queue: the global batch %d alone exceeds the official queue of %d",
                batch,
                SMALL_BATCH_QUEUE_LENGTH,
            )
        elif used < 1:
            log.info(
                "swav: no queue: a queue of %d would be full only after the run's last step",
                length,
            )
            length = 0
        else:
            log.info(
                "swav: queue of %d embeddings from epoch %d, in use for %d of %d steps",
                length,
                start,
                used,
                plan.total_steps,
            )
        fitted["queue_length"] = length
        return fitted

    @classmethod
    def schedule_warnings(cls, settings: Mapping[str, Any], plan: StepPlan) -> list[str]:
        """Prototypes frozen for the whole run; a set queue that never starts or never fills."""
        messages = []
        if settings["freeze_prototypes_iters"] is not None:
            key, value = "freeze_prototypes_iters", int(settings["freeze_prototypes_iters"])
            frozen = value
        else:
            key, value = "freeze_prototypes_epochs", int(settings["freeze_prototypes_epochs"])
            frozen = value * plan.steps_per_epoch
        if frozen >= plan.total_steps:
            messages.append(
                f"swav.{key} {value} freezes the prototypes for {frozen} steps, the whole "
                f"run of {plan.total_steps} steps ({plan.epochs} epochs of "
                f"{plan.steps_per_epoch}): they never train; lower swav.{key}"
            )
        length, start = int(settings["queue_length"] or 0), int(settings["queue_start_epoch"])
        if length > 0 and plan.epochs <= start:
            messages.append(
                f"swav.queue_length {length} never starts: swav.queue_start_epoch {start} "
                f"is not before the end of the run's {plan.epochs} epochs"
            )
        elif length > 0 and queue_steps_used(length, plan.batch_size, start, plan) < 1:
            messages.append(
                f"swav.queue_length {length} is never full: it takes "
                f"{math.ceil(length / plan.batch_size)} steps of batch {plan.batch_size} "
                f"from epoch {start}, the run has "
                f"{(plan.epochs - start) * plan.steps_per_epoch} steps left then"
            )
        return messages

    @property
    def views_per_sample(self) -> int:  # type: ignore[override]
        """Global plus local crops."""
        return int(self.settings["n_global_crops"]) + int(self.settings["n_local_crops"])

    def make_views(self, augment: Mapping[str, Any] | None, seed: int) -> MultiCrop:
        """Multi-crop views: the global crops first, then the local ones."""
        s = self.settings
        return MultiCrop(
            augment,
            n_global=int(s["n_global_crops"]),
            n_local=int(s["n_local_crops"]),
            local_size=float(s["local_size"]),
            global_crop_scale=s["global_crop_scale"],
            local_crop_scale=s["local_crop_scale"],
            seed=seed,
        )

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Rescale each prototype to unit L2 norm."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def on_epoch_start(self, epoch: int) -> None:
        """Note the epoch (for the prototype freeze); start the queue at ``queue_start_epoch``."""
        self.epoch = epoch
        self.queue_active = self.queue.shape[1] > 0 and epoch >= int(
            self.settings["queue_start_epoch"]
        )

    def embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Normalised embeddings of all crops, one backbone pass per crop resolution."""
        embeddings, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            embeddings.append(self.projector(self.backbone(torch.cat(views[start:end]))))
            start = end
        return F.normalize(torch.cat(embeddings), dim=1)

    @torch.no_grad()
    def codes(self, scores: torch.Tensor, embeddings: torch.Tensor, crop: int) -> torch.Tensor:
        """Sinkhorn codes of one global crop, over all ranks and the queue when it is full.

        The crop's embeddings (of every rank) then enter the queue (newest
        first), as the official code does within the same step. Returns this
        rank's rows.
        """
        batch = scores.shape[0]
        offset = distributed.rank() * batch
        scores = distributed.gather_detached(scores)
        s = self.settings
        if self.queue_active and self.training:
            embeddings = distributed.gather_detached(embeddings)
            global_batch = embeddings.shape[0]
            if global_batch > self.queue.shape[1]:
                raise ValueError(
                    f"swav.queue_length {self.queue.shape[1]} is shorter than a batch "
                    f"of {global_batch}"
                )
            if int(self.queue_filled) >= self.queue.shape[1]:
                queued = self.queue[crop] @ self.prototypes.weight.T
                scores = torch.cat([scores, queued.to(scores.dtype)])
            self.queue[crop] = torch.cat(
                [embeddings.to(self.queue.dtype), self.queue[crop, :-global_batch]]
            )
        codes = sinkhorn_knopp(scores, float(s["epsilon"]), int(s["sinkhorn_iterations"]))
        return codes[offset : offset + batch]

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Swapped prediction of every crop's scores against the global crops' codes."""
        if len(views) != self.views_per_sample:
            raise ValueError(f"SwAV expects {self.views_per_sample} crops, got {len(views)}")
        batch = views[0].shape[0]
        embeddings = self.embed(views)
        weight = (
            self.prototypes.weight.detach() if self.prototypes_frozen() else self.prototypes.weight
        )
        scores = (embeddings @ weight.T).split(batch)
        n_global = int(self.settings["n_global_crops"])
        codes = [
            self.codes(scores[i].detach(), embeddings[i * batch : (i + 1) * batch].detach(), i)
            for i in range(n_global)
        ]
        if self.queue_active and self.training:
            global_batch = batch * distributed.world_size()
            self.queue_filled.add_(global_batch).clamp_(max=self.queue.shape[1])
        return swapped_prediction(scores, codes, float(self.settings["temperature"]))

    def prototypes_frozen(self) -> bool:
        """Whether this step leaves the prototypes alone: within the freeze's steps or epochs."""
        iters = self.settings["freeze_prototypes_iters"]
        if iters is not None:
            return int(self.steps_done) < int(iters)
        return self.epoch < int(self.settings["freeze_prototypes_epochs"])

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Count the step (for the prototype freeze) and re-normalise the prototypes."""
        del step, total_steps
        self.steps_done.add_(1)
        self.normalize_prototypes()


def queue_steps_used(length: int, batch: int, start_epoch: int, plan: StepPlan) -> int:
    """Steps of the run in which a queue of ``length`` joins Sinkhorn.

    The queue fills from ``start_epoch`` at one global batch a step and is
    used once full (as main_swav.py does), so the first
    ``ceil(length / batch)`` steps after its start only fill it.
    """
    if length < 1:
        return 0
    after_start = max(0, plan.epochs - start_epoch) * plan.steps_per_epoch
    return max(0, after_start - math.ceil(length / batch))
