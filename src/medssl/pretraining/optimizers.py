"""Optimisers of the self-supervised originals, one registry for the trainer.

The originals train with different optimisers: LARS (SimCLR, SwAV, BYOL,
Barlow Twins), LAMB (SparK), SGD with momentum (MoCo v2). torch ships
neither LARS nor LAMB, so both are written here from their papers; they
share the layer-wise trust ratio (:func:`trust_ratio`) and the convention
for biases and normalisation parameters (groups flagged ``lars_exclude``,
see :meth:`medssl.pretraining.methods.base.Method.optimizer_groups`), which get neither
weight decay nor the trust ratio: their norms say nothing about a sensible
step size, and the originals exclude them likewise. Parameters a method
names itself (SparK's mask tokens) join that convention through
:func:`exempt_from_decay`, which every optimiser here honours alike.

:data:`OPTIMIZERS` maps the config's ``optimizer`` name to a builder; the
state dicts are torch's ordinary ones (per-parameter momentum or moment
buffers), so checkpoints written by the trainer resume with any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from medssl.core.registry import Registry

ParamGroups = list[dict[str, Any]]


def trust_ratio(param: torch.Tensor, update: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``coefficient * ||param|| / ||update||``, or 1 where either norm is zero.

    A zero weight (a fresh zero-initialised layer) or a zero update would make
    the ratio 0 or infinite; both LARS and LAMB fall back to the plain step.
    Kept as a tensor so no device-to-host sync happens per parameter.
    """
    param_norm = torch.linalg.vector_norm(param)
    update_norm = torch.linalg.vector_norm(update)
    usable = (param_norm > 0) & (update_norm > 0)
    ratio = coefficient * param_norm / update_norm
    return torch.where(usable, ratio, torch.ones_like(ratio))


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., 2017) over SGD with momentum.

    For each parameter tensor ``w`` with gradient ``g`` not in an excluded group::

        d = g + weight_decay * w
        d = d * trust_coefficient * ||w|| / ||d||     (when both norms are > 0)
        v = momentum * v + d;  w = w - lr * v

    as in the SimCLR, BYOL and Barlow Twins code. The trust coefficient 0.001
    is the paper's (and theirs).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(
                f"invalid LARS hyper-parameters lr={lr} momentum={momentum} "
                f"weight_decay={weight_decay} trust_coefficient={trust_coefficient}"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> torch.Tensor | None:
        """One LARS update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        update = update.add(param, alpha=group["weight_decay"])
                    update = update * trust_ratio(param, update, group["trust_coefficient"])
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.detach().clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


class LAMB(Optimizer):
    """Layer-wise adaptive Adam (You et al., 2020, Algorithm 2), SparK's optimiser.

    With bias-corrected Adam moments as in the official implementations::

        m = b1 * m + (1 - b1) * g;   v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
        w = w - lr * (||w|| / ||r||) * r          (trust ratio 1 when a norm is 0)

    Excluded groups take the plain Adam step. ``betas`` default (0.9, 0.95),
    SparK's choice for ResNets.
    """

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
                    update.mul_(trust_ratio(param, update, 1.0))
                param.add_(update, alpha=-group["lr"])
        return loss


def exempt_from_decay(groups: ParamGroups, parameters: Iterable[torch.Tensor]) -> ParamGroups:
    """``groups`` with ``parameters`` moved out of every decaying group into an exempt one.

    The general form of the bias/norm convention for parameters a method names
    itself (:meth:`medssl.pretraining.methods.spark.SparK.no_decay_parameters`:
    SparK's mask tokens, exempt in the official code by name): the new group
    has weight decay 0 and ``lars_exclude`` set, so every optimiser here
    honours it alike: LARS and LAMB skip decay and the trust ratio (LAMB's
    step is then plain Adam, as in timm's LAMB for groups without decay),
    AdamW, Adam and SGD read the group's zero ``weight_decay``, and the
    trainer's decay schedule leaves it at zero. Parameters already in an
    exempt group stay where they are; the new group keeps the other options
    (``lr_scale``...) of the group each parameter came from, so one exempt
    group is made per source group. Empty groups are dropped.
    """
    named = {id(p) for p in parameters}
    result: ParamGroups = []
    for group in groups:
        params = list(group["params"])
        if group.get("lars_exclude", False) or not named.intersection(map(id, params)):
            result.append(group)
            continue
        kept = [p for p in params if id(p) not in named]
        moved = [p for p in params if id(p) in named]
        if kept:
            result.append({**group, "params": kept})
        result.append({**group, "params": moved, "weight_decay": 0.0, "lars_exclude": True})
    return result


def _adamw(groups: ParamGroups, lr: float, config: Mapping[str, Any]) -> Optimizer:
    return torch.optim.AdamW(groups, lr=lr, weight_decay=float(config["weight_decay"]))


def _adam(groups: ParamGroups, lr: float, config: Mapping[str, Any]) -> Optimizer:
    # Adam's L2-coupled decay, as lucidrains' BYOL (Adam 3e-4) uses it.
    return torch.optim.Adam(groups, lr=lr, weight_decay=float(config["weight_decay"]))


def _sgd(groups: ParamGroups, lr: float, config: Mapping[str, Any]) -> Optimizer:
    return torch.optim.SGD(
        groups,
        lr=lr,
        momentum=float(config["momentum"]),
        weight_decay=float(config["weight_decay"]),
    )


def _lars(groups: ParamGroups, lr: float, config: Mapping[str, Any]) -> Optimizer:
    return LARS(
        groups,
        lr=lr,
        momentum=float(config["momentum"]),
        weight_decay=float(config["weight_decay"]),
    )


def _lamb(groups: ParamGroups, lr: float, config: Mapping[str, Any]) -> Optimizer:
    return LAMB(groups, lr=lr, weight_decay=float(config["weight_decay"]))


OptimizerBuilder = Callable[[ParamGroups, float, Mapping[str, Any]], Optimizer]

OPTIMIZERS: Registry[OptimizerBuilder] = Registry(
    "optimizer",
    {"adamw": _adamw, "adam": _adam, "sgd": _sgd, "lars": _lars, "lamb": _lamb},
)
"""Optimiser builders by config name: ``(param groups, peak lr, trainer config) -> Optimizer``."""


def build(name: str, groups: ParamGroups, lr: float, config: Mapping[str, Any]) -> Optimizer:
    """The optimiser registered as ``name`` over ``groups`` at peak learning rate ``lr``.

    A group may carry ``lr_scale`` (Barlow Twins trains biases and BatchNorm
    parameters at 0.024 x the weights' rate); its ``lr`` is set accordingly,
    and the schedule multiplies every group's own initial rate.
    """
    builder = OPTIMIZERS[name]
    scaled = []
    for group in groups:
        group = dict(group)
        scale = float(group.pop("lr_scale", 1.0))
        if scale != 1.0:
            group["lr"] = lr * scale
        scaled.append(group)
    return builder(scaled, lr, config)
