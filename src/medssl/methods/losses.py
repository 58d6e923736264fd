"""Loss functions of the self-supervised methods, as plain functions of embeddings.

Kept free of modules and state so that each can be checked against a slow
reference implementation of the paper's formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        logits = z @ z.T / temperature
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, positives)
