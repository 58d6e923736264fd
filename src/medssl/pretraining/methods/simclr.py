"""SimCLR (Chen et al., 2020): contrast two augmented views through a projection head."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medssl.pretraining import distributed
from medssl.pretraining.methods.base import Method, register
from medssl.pretraining.methods.loss_helpers import wide


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


@register("simclr")
class SimCLR(Method):
    """Backbone, 2-layer MLP projection head and the NT-Xent loss.

    The head is Linear(d, d) - BN - ReLU - Linear(d, proj_dim), d the
    backbone's feature width; the loss is computed on its output while the
    backbone's features are what transfers (the paper shows the representation
    before the head is better). ``temperature`` 0.1 is the paper's default
    for its LARS / large-batch setting. Under DDP the negatives are the
    whole global batch, gathered from every rank, as in the official code.
    """

    default_settings: ClassVar[dict[str, Any]] = {"temperature": 0.1, "proj_dim": 128}
    # google-research/simclr: LARS, lr 0.3 x batch/256, weight decay 1e-6,
    # 10 warm-up epochs, cosine decay to 0; biases and BN excluded from both.
    optim_recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "lars",
        "lr": 0.3,
        "lr_scaling": "linear",
        "weight_decay": 1e-6,
        "momentum": 0.9,
        "warmup_epochs": 10,
        "final_lr_fraction": 0.0,
    }

    def __init__(self, backbone: nn.Module, settings: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, settings)
        width = self.feature_dim
        self.projector = nn.Sequential(
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, int(self.settings["proj_dim"])),
        )

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """NT-Xent between the projections of the two views."""
        if len(views) != 2:
            raise ValueError(f"SimCLR needs 2 views per sample, got {len(views)}")
        # One backbone pass over both views: BatchNorm statistics then cover the
        # 2N images the loss contrasts, and it is faster than two passes.
        n = views[0].shape[0]
        projections = self.projector(self.backbone(torch.cat(views)))
        z1, z2 = distributed.gather(projections[:n]), distributed.gather(projections[n:])
        return nt_xent(z1, z2, float(self.settings["temperature"]))
