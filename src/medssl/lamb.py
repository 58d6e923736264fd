"""The LAMB optimiser (You et al., 2020, "Large batch optimization for deep learning").

SparK pre-trains with LAMB and torch ships none, so it is written here from
the paper (Algorithm 2, with bias-corrected Adam moments as in the official
implementations). For each parameter tensor ``w`` with gradient ``g``::

    m = b1 * m + (1 - b1) * g;   v = b2 * v + (1 - b2) * g * g
    r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
    w = w - lr * (||w|| / ||r||) * r          (trust ratio 1 when a norm is 0)

Groups flagged ``lars_exclude`` (biases and BatchNorm parameters, see
:meth:`medssl.methods.base.Method.optimizer_groups`) take the plain Adam step
without decay or trust ratio, as the common implementations do for groups
without weight decay: a norm-based step size means nothing for a bias.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class LAMB(Optimizer):
    """Layer-wise adaptive Adam; ``betas`` default (0.9, 0.95), SparK's choice for ResNets."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"invalid LAMB hyper-parameters lr={lr} betas={betas} eps={eps} "
                f"weight_decay={weight_decay}"
            )
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> torch.Tensor | None:
        """One LAMB update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = float(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
                update = (exp_avg / (1 - beta1**step)) / denom
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        update.add_(param, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(param)
                    update_norm = torch.linalg.vector_norm(update)
                    usable = (param_norm > 0) & (update_norm > 0)
                    ratio = torch.where(
                        usable, param_norm / update_norm, torch.ones_like(param_norm)
                    )
                    update.mul_(ratio)
                param.add_(update, alpha=-group["lr"])
        return loss
