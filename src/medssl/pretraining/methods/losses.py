"""Loss functions of the self-supervised methods, as plain functions of embeddings.

Kept free of modules and state so that each can be checked against a slow
reference implementation of the paper's formula.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it already is.

    The losses run in float32 under autocast because log-sum-exps and
    batch standardisation lose too much in bfloat16; float64 input stays
    float64 so precise comparisons (the DDP test) are not capped at float32.
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalized temperature-scaled cross entropy (Chen et al., 2020, eq. 1).

    ``z1[k]`` and ``z2[k]`` are projections of two views of sample ``k``. The 2N
    embeddings are L2-normalised; for anchor ``i`` with positive ``j(i)``
    (its other view)::

        l(i) = -log( exp(s_ij / t) / sum_{m != i} exp(s_im / t) )

    where ``s`` is cosine similarity: the denominator holds the positive and
    the 2(N-1) negatives, never the anchor itself. The loss is the mean of
    ``l`` over all 2N anchors. Computed in float32 whatever the autocast dtype,
    because the log-sum-exp of ``1 / t``-scaled similarities loses too much
    precision in bfloat16.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"nt_xent needs two (N, D) tensors of one shape, got {z1.shape}, {z2.shape}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n = z1.shape[0]
    # Autocast would run the matmul in bfloat16 even on float32 inputs; opt out here.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z = F.normalize(wide(torch.cat([z1, z2])), dim=1)
        logits = z @ z.T / temperature
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, positives)


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"{name} needs two (N, D) tensors of one shape, got {a.shape}, {b.shape}")


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
    _check_pair("info_nce", query, key)
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


def byol_regression(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's loss for one direction (Grill et al., 2020, eq. 2): ``2 - 2 cos(p, z')``.

    The squared distance of the L2-normalised prediction and target
    projection, averaged over the batch; the target gets no gradient. BYOL
    symmetrises by adding the loss with the views swapped.
    """
    _check_pair("byol_regression", prediction, target)
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        cosine = F.cosine_similarity(wide(prediction), wide(target.detach()), dim=1)
        return (2 - 2 * cosine).mean()


def barlow_twins(
    z1: torch.Tensor, z2: torch.Tensor, off_diagonal_weight: float, eps: float = 1e-5
) -> torch.Tensor:
    """Barlow Twins' redundancy-reduction loss (Zbontar et al., 2021, eq. 1-2).

    Each embedding dimension is standardised over the batch (mean 0, biased
    variance 1 plus ``eps``, as an affine-free BatchNorm in training mode),
    then the cross-correlation ``C = z1n.T @ z2n / N`` (D x D) is pushed to
    the identity::

        L = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2

    ``off_diagonal_weight`` is lambda (0.0051 in the paper).
    """
    _check_pair("barlow_twins", z1, z2)
    if z1.shape[0] < 2:
        raise ValueError("barlow_twins needs a batch of at least 2 to standardise over")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a, b = (F.batch_norm(wide(z), None, None, training=True, eps=eps) for z in (z1, z2))
        correlation = a.T @ b / z1.shape[0]
        diagonal = torch.diagonal(correlation)
        on_diagonal = (diagonal - 1).pow(2).sum()
        off_diagonal = correlation.pow(2).sum() - diagonal.pow(2).sum()
        return on_diagonal + off_diagonal_weight * off_diagonal
