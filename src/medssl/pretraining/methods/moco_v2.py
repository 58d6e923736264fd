"""MoCo v2 (He et al., 2020; Chen et al., 2020): contrast queries with a queue of momentum keys."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medssl.pretraining import distributed
from medssl.pretraining.methods.base import Method, register
from medssl.pretraining.methods.heads import ema_update, frozen_copy, mlp
from medssl.pretraining.methods.loss_helpers import check_pair, wide

if TYPE_CHECKING:
    from medssl.pretraining.loop import StepPlan

log = logging.getLogger(__name__)

OFFICIAL_QUEUE_SIZE = 65536
"""facebookresearch/moco, moco/builder.py ``K=65536`` (main_moco.py ``--moco-k``); the
builder asserts that it is a multiple of the global batch."""

KEY_ENCODER_STILL_INITIAL_LIMIT = 0.5
"""A key encoder that keeps more than this share of its initial weights at the end of
the run has hardly followed the query encoder."""


def info_nce(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """MoCo's InfoNCE with a queue of negatives (He et al., 2020, eq. 1).

    ``query`` and ``key`` (N, D) are L2-normalised here; ``queue`` (M, D)
    holds earlier, already normalised keys. For each query ``q`` with its key
    ``k+``::

        l = -log( exp(q.k+ / t) / (exp(q.k+ / t) + sum_m exp(q.queue_m / t)) )

    averaged over the batch: an (M + 1)-way classification whose correct
    class is the positive. No gradient reaches the key or the queue.
    """
    check_pair("info_nce", query, key)
    if queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(f"queue must be (M, {query.shape[1]}), got {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = F.normalize(wide(query), dim=1)
        k = F.normalize(wide(key.detach()), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)
        negative = q @ wide(queue.detach()).T
        logits = torch.cat([positive, negative], dim=1) / temperature
        target = torch.zeros(len(q), dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, target)


@register("moco_v2")
class MoCoV2(Method):
    """Query encoder (backbone + 2-layer MLP head), momentum key encoder and a key queue.

    The head is Linear(d, d) - ReLU - Linear(d, 128) without BatchNorm (the
    v2 paper's). Keys come from a copy of the query encoder whose parameters
    follow it by ``momentum`` 0.999 after every optimiser step; the queue
    holds the last ``queue_size`` keys (65,536 in the paper) as negatives,
    temperature 0.2. The queue starts as random unit vectors, which ImageNet
    flushes within an epoch but a small pool may not in the whole run, so
    ``queue_size`` null is fitted to the run (:meth:`fit_to_run`). As in the
    official code the loss is one-directional: view 0 is the query, view 1
    the key.

    Shuffle BN. With several GPUs the official code shuffles the key batch
    across devices so that the key encoder's BatchNorm statistics come from
    other samples than the query's, which stops the model from using batch
    statistics to find its positive; so does this class under DDP (BatchNorm
    stays per rank, and the queue takes every rank's keys). In one process, shuffling alone changes
    nothing (BatchNorm over the whole batch is permutation invariant). The
    substitute here, as in the MoCo authors' single-GPU demo, is
    ``key_bn_splits`` > 1: the key batch is shuffled, split into that many
    groups, each normalised by its own statistics, and unshuffled. The
    default 1 keeps plain BatchNorm, which for small CPU batches is the
    better-conditioned choice.
    """

    default_settings: ClassVar[dict[str, Any]] = {
        "proj_dim": 128,
        # null: OFFICIAL_QUEUE_SIZE, at most one epoch of keys (fit_to_run).
        "queue_size": None,
        "temperature": 0.2,
        "momentum": 0.999,
        "key_bn_splits": 1,
    }
    # facebookresearch/moco (v2, 200 epochs): SGD, lr 0.03 per 256 images,
    # momentum 0.9, weight decay 1e-4, cosine schedule without warm-up.
    optim_recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd",
        "lr": 0.03,
        "lr_scaling": "linear",
        "weight_decay": 1e-4,
        "momentum": 0.9,
        "warmup_epochs": 0,
        "final_lr_fraction": 0.0,
    }
    sync_batch_norm: ClassVar[bool] = False
    exclude_bias_and_norm: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module, settings: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, settings)
        width, dim = self.feature_dim, int(self.settings["proj_dim"])
        if self.settings["queue_size"] is None:
            # Built without a run (tests, benchmarks): the official size.
            self.settings["queue_size"] = OFFICIAL_QUEUE_SIZE
        queue_size = int(self.settings["queue_size"])
        if queue_size < 1 or int(self.settings["key_bn_splits"]) < 1:
            raise ValueError("moco_v2.queue_size and moco_v2.key_bn_splits must be at least 1")
        if not 0.0 <= float(self.settings["momentum"]) <= 1.0:
            raise ValueError(f"moco_v2.momentum must be in [0, 1], got {self.settings['momentum']}")
        self.head = mlp([width, width, dim], batch_norm=False)
        self.key_encoder = frozen_copy(nn.Sequential(self.backbone, self.head))
        # Random unit vectors until real keys replace them, as in the official code.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self._pending_keys: torch.Tensor | None = None

    @classmethod
    def fit_to_run(cls, settings: Mapping[str, Any], plan: StepPlan) -> dict[str, Any]:
        """A null ``queue_size`` becomes 65,536 keys or one epoch's, whichever is fewer.

        Rounded down to a multiple of the global batch (the official code
        requires one), so real keys replace every random vector within the
        first epoch. A set size below one global batch is refused: a step's
        keys would not fit.
        """
        fitted = dict(settings)
        batch = plan.batch_size
        if fitted["queue_size"] is not None:
            if int(fitted["queue_size"]) < batch:
                raise ValueError(
                    f"moco_v2.queue_size {fitted['queue_size']} is smaller than the global "
                    f"batch {batch}: a step's keys would not fit"
                )
            return fitted
        epoch_keys = plan.steps_per_epoch * batch
        fitted["queue_size"] = min(OFFICIAL_QUEUE_SIZE, epoch_keys) // batch * batch
        log.info(
            "moco_v2: queue of %d keys (%d steps of batch %d)",
            fitted["queue_size"],
            fitted["queue_size"] // batch,
            batch,
        )
        return fitted

    @classmethod
    def schedule_warnings(cls, settings: Mapping[str, Any], plan: StepPlan) -> list[str]:
        """Random vectors left in the queue at the end; a key encoder that hardly moves."""
        messages = []
        size, keys_seen = int(settings["queue_size"]), plan.total_steps * plan.batch_size
        if size > keys_seen:
            messages.append(
                f"moco_v2.queue_size {size} never fills: the run makes {keys_seen} keys "
                f"({plan.total_steps} steps of {plan.batch_size}), so {size - keys_seen} "
                f"random vectors stay negatives to the end; lower moco_v2.queue_size"
            )
        momentum = float(settings["momentum"])
        share = momentum**plan.total_steps
        if share > KEY_ENCODER_STILL_INITIAL_LIMIT:
            messages.append(
                f"moco_v2.momentum {momentum} over {plan.total_steps} steps leaves "
                f"{100 * share:.0f} % of the key encoder's initial weights at the end: "
                f"the keys come from a nearly random network; lower moco_v2.momentum "
                f"or train longer"
            )
        return messages

    def query_encoder(self) -> nn.Sequential:
        """Backbone and head in the order their parameters pair with the key encoder's."""
        return nn.Sequential(self.backbone, self.head)

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised keys, with per-group BatchNorm statistics when ``key_bn_splits`` > 1.

        Under DDP the groups are the ranks (``key_bn_splits`` is then unused).
        """
        if distributed.active():
            return self.shuffled_keys(images)
        splits = int(self.settings["key_bn_splits"])
        if splits == 1:
            return F.normalize(self.key_encoder(images), dim=1)
        if len(images) % splits:
            raise ValueError(f"batch {len(images)} is not divisible by key_bn_splits {splits}")
        order = torch.randperm(len(images), device=images.device)
        shuffled = torch.cat([self.key_encoder(chunk) for chunk in images[order].chunk(splits)])
        keys = torch.empty_like(shuffled)
        keys[order] = shuffled
        return F.normalize(keys, dim=1)

    @torch.no_grad()
    def shuffled_keys(self, images: torch.Tensor) -> torch.Tensor:
        """Keys of this rank's ``images``, computed on a random share of the global batch.

        Rank 0 draws the permutation of the gathered images; each rank encodes
        its slice of it (BatchNorm over other samples than its queries'), and
        the gathered keys are put back in order.
        """
        n, world, rank = len(images), distributed.world_size(), distributed.rank()
        everything = distributed.gather_detached(images)
        order = distributed.broadcast(torch.randperm(len(everything), device=images.device))
        mine = order.view(world, n)[rank]
        shuffled = distributed.gather_detached(self.key_encoder(everything[mine]))
        keys = torch.empty_like(shuffled)
        keys[order] = shuffled
        return F.normalize(keys[rank * n : (rank + 1) * n], dim=1)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """InfoNCE of the queries against their keys and the queue.

        The keys are queued only in :meth:`on_step_end`, after the optimiser
        step, so the negatives of a step never include its own positives.
        """
        if len(views) != 2:
            raise ValueError(f"MoCo v2 needs 2 views per sample, got {len(views)}")
        query = self.head(self.backbone(views[0]))
        key = self.keys(views[1])
        if self.training:
            self._pending_keys = distributed.gather_detached(key.detach())
        return info_nce(query, key, self.queue, float(self.settings["temperature"]))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest queue entries with ``keys`` (a ring buffer)."""
        size = self.queue.shape[0]
        if len(keys) > size:
            raise ValueError(f"a batch of {len(keys)} keys does not fit a queue of {size}")
        slots = (self.queue_pointer + torch.arange(len(keys), device=keys.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_pointer.copy_((self.queue_pointer + len(keys)) % size)

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Momentum update of the key encoder, then queue this step's keys."""
        del step, total_steps
        ema_update(self.key_encoder, self.query_encoder(), float(self.settings["momentum"]))
        if self._pending_keys is not None:
            self.enqueue(self._pending_keys)
            self._pending_keys = None
