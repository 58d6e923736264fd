"""methods.base: parameter groups and settings every method shares."""

from __future__ import annotations

import pytest

from medssl.core.registry import UnknownNameError
from medssl.models.backbones import build_backbone
from medssl.pretraining.methods import METHODS, build_method, method_class
from medssl.pretraining.methods.base import register
from tests.pretraining.methods.small_methods import SMALL_HEADS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_optimizer_groups_cover_every_parameter_once(name: str) -> None:
    method = build_method(name, build_backbone("resnet_small", 1), SMALL_HEADS.get(name, {}))
    groups = method.optimizer_groups()
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in method.parameters() if p.requires_grad)
    excluded = [g for g in groups if g["lars_exclude"]]
    # MoCo's SGD and SwAV's LARC decay and adapt biases and BatchNorm like weights.
    assert bool(excluded) == method_class(name).exclude_bias_and_norm
    assert bool(excluded) == (name not in ("moco_v2", "swav"))
    assert all(g["weight_decay"] == 0.0 for g in excluded)
    # Besides biases and norms, only what the method declares exempt (SparK's mask tokens).
    declared = {id(p) for p in getattr(method, "no_decay_parameters", list)()}
    assert all(p.ndim <= 1 or id(p) in declared for g in excluded for p in g["params"])


def test_settings_override_defaults_and_typos_fail() -> None:
    method = build_method("simclr", build_backbone("resnet_small", 3), {"proj_dim": 32})
    assert method.settings == {"temperature": 0.1, "proj_dim": 32}
    assert method.projector[-1].out_features == 32
    with pytest.raises(KeyError, match="temprature"):
        build_method("simclr", build_backbone("resnet_small", 1), {"temprature": 0.2})


def test_a_class_under_an_unlisted_name_is_refused() -> None:
    """``register`` takes only names of :data:`METHODS`: another could never be built."""
    with pytest.raises(UnknownNameError, match="unknown method 'simclr2'; did you mean 'simclr'"):
        register("simclr2")
