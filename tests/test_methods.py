"""Every registered method trains one step on a tiny batch."""

from __future__ import annotations

import pytest
import torch

from medssl.pretraining.methods import METHODS, Method, build_method
from medssl.models.backbones import build_backbone

SMALL_HEADS: dict[str, dict] = {
    "barlow_twins": {"proj_dims": [64, 64, 64]},
    "byol": {"hidden_dim": 64, "proj_dim": 32},
    "moco_v2": {"queue_size": 64},
    "swav": {"hidden_dim": 64, "n_prototypes": 16, "n_local_crops": 2},
}
"""CPU-sized overrides of the official head widths, so each test takes a second."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_forward_backward_is_finite(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(name, build_backbone("resnet_small", 1), SMALL_HEADS.get(name, {}))
    assert isinstance(method, Method)
    # 64x64: the smallest input on which SparK's input/32 mask grid can hide and show patches.
    views = [torch.rand(4, 1, 64, 64) for _ in range(method.views_per_sample)]
    loss = method(views)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in method.encoder().parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    method.on_step_end(1, 10)
    assert method.encoder() is method.backbone


@pytest.mark.parametrize("name", sorted(METHODS))
def test_optimizer_groups_cover_every_parameter_once(name: str) -> None:
    method = build_method(name, build_backbone("resnet_small", 1), SMALL_HEADS.get(name, {}))
    groups = method.optimizer_groups()
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in method.parameters() if p.requires_grad)
    excluded = [g for g in groups if g["lars_exclude"]]
    # MoCo's SGD and SwAV's LARC decay and adapt biases and BatchNorm like weights.
    assert bool(excluded) == METHODS[name].exclude_bias_and_norm
    assert bool(excluded) == (name not in ("moco_v2", "swav"))
    assert all(g["weight_decay"] == 0.0 for g in excluded)
    assert all(p.ndim <= 1 for g in excluded for p in g["params"])


def test_unknown_method_lists_registered_names() -> None:
    with pytest.raises(KeyError, match="registered") as info:
        build_method("no-such-method", build_backbone("resnet_small", 1), {})
    assert "simclr" in str(info.value)


def test_settings_override_defaults_and_typos_fail() -> None:
    method = build_method("simclr", build_backbone("resnet_small", 3), {"proj_dim": 32})
    assert method.settings == {"temperature": 0.1, "proj_dim": 32}
    assert method.projector[-1].out_features == 32
    with pytest.raises(KeyError, match="temprature"):
        build_method("simclr", build_backbone("resnet_small", 1), {"temprature": 0.2})
