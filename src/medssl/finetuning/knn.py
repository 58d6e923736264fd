"""A weighted k-nearest-neighbour probe on frozen features (the ``knn`` protocol).

The probe trains nothing, so it measures what an encoder's features already
hold without a head's optimisation in between. It follows the protocol of
DINO (Caron et al. 2021), which solo-learn and most self-supervised papers
report beside the linear probe:

* every training image is encoded once by the frozen encoder, its pooled
  features L2-normalised: the :class:`FeatureBank`;
* a query's similarity to each bank entry is the cosine (a dot product of
  unit vectors); its ``k`` most similar entries vote, each with weight
  ``exp(similarity / temperature)``;
* a class's score is the sum of the weights of the neighbours of that class.
  DINO ranks these raw scores; here they are divided by their sum so they are
  probabilities, and :meth:`medssl.finetuning.tasktypes.TaskType.assess`
  (AUC, validation thresholds, flags) scores them as it scores a trained head.
  A multi-label task gets, per label, the weighted share of neighbours that
  have it.

DINO's defaults are ``k = 20`` and ``temperature = 0.07``
(:data:`DEFAULT_K`, :data:`DEFAULT_TEMPERATURE`).

Memory: the bank is filled batch by batch (:func:`build_bank`), and queries
are scored in chunks so that only a ``chunk x bank`` similarity matrix exists
at a time (:func:`knn_scores`), whatever the bank's size.

:class:`NeighbourClassifier` wraps encoder and bank as a module whose outputs
are the logits of the kNN probabilities under the task type's link (sigmoid
or softmax), so the fine-tuning loop's prediction, loss, test-time
augmentation and assessment run on it unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from medssl.core.registry import look_up
from medssl.core.task_types import task_type_spec

log = logging.getLogger(__name__)

DEFAULT_K = 20
"""Neighbours that vote (DINO: 20 "usually works the best" of 10, 20, 100, 200)."""

DEFAULT_TEMPERATURE = 0.07
"""Temperature of the vote weights ``exp(similarity / T)`` (DINO's)."""

SIMILARITY_BUDGET = 2**24
"""Most entries of one ``chunk x bank`` similarity matrix (64 MiB in float32)."""

PROBABILITY_FLOOR = 1e-6
"""Smallest probability a :class:`NeighbourClassifier` turns into a logit: a class no
neighbour voted for has probability 0, whose logit would be -inf (and its loss infinite)."""

VOTING_TYPES = ("binary", "multiclass", "multilabel")
"""Task types the probe can answer: one label (or label set) per image."""


@dataclass(frozen=True)
class FeatureBank:
    """The training subset as the probe sees it: unit-length features and their targets.

    ``features`` is ``N x D`` float32 with rows of L2 norm 1; ``targets`` are
    the task type's training targets (:meth:`TaskType.targets`): ``N`` class
    codes for binary and multi-class, ``N x L`` 0/1 values for multi-label.
    """

    features: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise ValueError(
                f"feature bank: features must be N x D, got {tuple(self.features.shape)}"
            )
        if len(self.targets) != len(self.features):
            raise ValueError(
                f"feature bank: {len(self.features)} feature rows but {len(self.targets)} targets"
            )
        if len(self.features) == 0:
            raise ValueError("feature bank is empty: the kNN probe needs training images")

    def __len__(self) -> int:
        return len(self.features)


def normalise(features: torch.Tensor) -> torch.Tensor:
    """Pooled features as float32 rows of L2 norm 1, so a dot product is the cosine similarity."""
    if features.ndim != 2:
        raise ValueError(
            "kNN probe: the encoder must return pooled N x D features, "
            f"got shape {tuple(features.shape)}"
        )
    if not torch.isfinite(features).all():
        raise ValueError("kNN probe: the encoder's features contain NaN/inf")
    return nn.functional.normalize(features.float(), dim=1)


@torch.no_grad()
def build_bank(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> FeatureBank:
    """Encode ``(images, targets)`` batches with the frozen ``encode`` into one bank.

    ``encode`` maps images to pooled ``N x D`` features (for a backbone: the
    backbone in eval mode). Batches bound the memory of the forward passes;
    only the features are kept.
    """
    features, targets = [], []
    for images, batch_targets in batches:
        features.append(normalise(encode(images)))
        targets.append(batch_targets)
    if not features:
        raise ValueError("feature bank is empty: the kNN probe needs training images")
    return FeatureBank(torch.cat(features), torch.cat(targets))


def _chunk_rows(bank_size: int, chunk_size: int | None) -> int:
    """Queries per chunk: as given, or as many as :data:`SIMILARITY_BUDGET` allows."""
    if chunk_size is None:
        return max(1, SIMILARITY_BUDGET // bank_size)
    if chunk_size < 1:
        raise ValueError(f"kNN probe: chunk_size must be at least 1, got {chunk_size}")
    return chunk_size


def check_probe_settings(k: int, temperature: float) -> None:
    """``knn_k`` a positive integer, ``knn_temperature`` a positive number."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"finetune.knn_k must be an integer >= 1, got {k!r}")
    if isinstance(temperature, bool) or not float(temperature) > 0:
        raise ValueError(f"finetune.knn_temperature must be > 0, got {temperature!r}")


def check_task_type(task_type: str) -> str:
    """``task_type`` when the probe can answer it; segmentation and unknown names are refused."""
    spec = task_type_spec(task_type)
    if spec.dense or spec.labels_from_masks:
        raise ValueError(
            f"the knn protocol cannot score a {task_type} task: it votes one label (set) per "
            "image from its neighbours, and a mask has a label per pixel; use protocol "
            "'linear' (decoder on the frozen encoder) or 'full'"
        )
    return str(look_up("kNN task type", task_type, VOTING_TYPES))


def _check_targets(bank: FeatureBank, task_type: str, n_outputs: int) -> None:
    """The bank's targets are what ``task_type`` with ``n_outputs`` outputs trains on."""
    targets = bank.targets
    if task_type == "multilabel":
        if targets.ndim != 2 or targets.shape[1] != n_outputs:
            raise ValueError(
                f"kNN probe: multilabel bank targets must be N x {n_outputs}, "
                f"got {tuple(targets.shape)}"
            )
        return
    classes = 2 if task_type == "binary" else n_outputs
    if targets.ndim != 1 or targets.is_floating_point():
        raise ValueError(f"kNN probe: {task_type} bank targets must be N integer class codes")
    if int(targets.min()) < 0 or int(targets.max()) >= classes:
        raise ValueError(
            f"kNN probe: {task_type} bank targets must be codes 0..{classes - 1}, "
            f"got {int(targets.min())}..{int(targets.max())}"
        )


def _vote(
    bank: FeatureBank,
    similarity: torch.Tensor,
    k: int,
    temperature: float,
    task_type: str,
    n_outputs: int,
) -> torch.Tensor:
    """Probabilities of one chunk of queries from its ``chunk x bank`` similarities."""
    nearest, index = similarity.topk(k, dim=1, largest=True, sorted=True)
    # The weights are exp(sim / T) up to a factor per query: subtracting each query's
    # highest similarity leaves the normalised scores as they are but keeps exp from
    # overflowing at small temperatures (DINO computes exp(sim / T) directly).
    weights = torch.exp((nearest - nearest[:, :1]) / temperature)
    neighbours = bank.targets[index]
    if task_type == "multilabel":
        votes = (weights.unsqueeze(-1) * neighbours.float()).sum(1)
        # Clamped: the two sums round differently, and a share must not exceed 1.
        return (votes / weights.sum(1, keepdim=True)).clamp_(0.0, 1.0)
    classes = 2 if task_type == "binary" else n_outputs
    scores = weights.new_zeros(len(weights), classes).scatter_add_(1, neighbours, weights)
    probabilities = scores / scores.sum(1, keepdim=True)
    return probabilities[:, 1] if task_type == "binary" else probabilities


@torch.no_grad()
def knn_scores(
    bank: FeatureBank,
    query_features: torch.Tensor,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    n_outputs: int = 1,
    task_type: str = "binary",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Class probabilities of the queries from their ``k`` nearest bank entries.

    ``query_features`` are the encoder's pooled features (normalised here).
    The result has the shape :meth:`TaskType.probabilities` gives: ``N`` for
    binary (the positive class), ``N x K`` for multi-class (rows sum to 1),
    ``N x L`` for multi-label (per label, the weighted share of neighbours
    with it). ``k`` above the bank's size is clamped to it, with a warning.
    ``chunk_size`` queries are scored at a time (default: as many as
    :data:`SIMILARITY_BUDGET` allows); the answer does not depend on it.
    """
    task_type = check_task_type(task_type)
    check_probe_settings(k, temperature)
    _check_targets(bank, task_type, n_outputs)
    if k > len(bank):
        log.warning(
            "knn_k = %d but the training subset has %d images: using all %d as neighbours",
            k,
            len(bank),
            len(bank),
        )
        k = len(bank)
    queries = normalise(query_features).to(bank.features.device)
    rows = _chunk_rows(len(bank), chunk_size)
    parts = [
        _vote(bank, chunk @ bank.features.T, k, float(temperature), task_type, n_outputs)
        for chunk in torch.split(queries, rows)
    ]
    if not parts:
        shape = (0,) if task_type == "binary" else (0, n_outputs)
        return queries.new_zeros(shape)
    return torch.cat(parts)


def _to_logits(probabilities: torch.Tensor, task_type: str) -> torch.Tensor:
    """Logits whose sigmoid (binary, multi-label) or softmax (multi-class) are ``probabilities``.

    Probabilities are clipped to ``[PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR]``
    first, so a class without votes has a finite logit and a finite loss.
    """
    clipped = probabilities.clamp(PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    if task_type == "multiclass":
        return clipped.log()
    logits = torch.logit(clipped)
    return logits.unsqueeze(1) if task_type == "binary" else logits


class NeighbourClassifier(nn.Module):
    """A frozen backbone plus a feature bank, answering with kNN votes as logits.

    ``forward`` returns logits under the task type's link, so
    ``task_type.probabilities(model(images))`` are the kNN probabilities (to
    within :data:`PROBABILITY_FLOOR`) and the loop's loss is the cross-entropy
    of those probabilities. ``backbone`` stays an attribute, so exporting the
    encoder works as for a trained model; nothing here has a gradient.
    """

    def __init__(
        self,
        backbone: nn.Module,
        bank: FeatureBank,
        task_type: str,
        n_outputs: int,
        k: int = DEFAULT_K,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        super().__init__()
        check_probe_settings(k, temperature)
        self.task_type = check_task_type(task_type)
        _check_targets(bank, self.task_type, n_outputs)
        self.backbone = backbone.eval().requires_grad_(False)
        self.bank = bank
        self.n_outputs = n_outputs
        self.k = k
        self.temperature = float(temperature)

    def train(self, mode: bool = True) -> NeighbourClassifier:
        # The encoder is frozen in both senses: BatchNorm statistics never update.
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probabilities = knn_scores(
            self.bank,
            self.backbone(images),
            self.k,
            self.temperature,
            self.n_outputs,
            self.task_type,
        )
        return _to_logits(probabilities, self.task_type)


def neighbour_classifier(
    backbone: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    task_type: str,
    n_outputs: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 256,
) -> NeighbourClassifier:
    """The kNN probe of ``backbone`` on a training subset (``images`` and their ``targets``).

    The bank is encoded ``batch_size`` images at a time with the backbone in
    eval mode; ``targets`` are the task type's training targets.
    """
    if batch_size < 1:
        raise ValueError(f"kNN probe: batch_size must be at least 1, got {batch_size}")
    batches = zip(torch.split(images, batch_size), torch.split(targets, batch_size), strict=True)
    return probe_from_batches(backbone, batches, task_type, n_outputs, k, temperature)


def probe_from_batches(
    backbone: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    task_type: str,
    n_outputs: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> NeighbourClassifier:
    """The kNN probe of ``backbone`` with the ``(images, targets)`` batches as its bank.

    The task type is checked before the first batch is drawn, so a lazy
    iterable over a streamed split reads nothing for a task the probe refuses.
    """
    check_task_type(task_type)
    backbone.eval()
    bank = build_bank(backbone, batches)
    return NeighbourClassifier(backbone, bank, task_type, n_outputs, k, temperature)
