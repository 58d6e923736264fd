"""Fine-tuning protocols: what trains in which epoch, and at what learning rate.

How the loop obeys them (frozen weights stay frozen, early stopping waits for
the unfrozen backbone) is tested with the loop, in ``test_loop.py``.
"""

from __future__ import annotations

import pytest

from medssl.core.registry import UnknownNameError
from medssl.finetuning.loop import resolve_settings
from medssl.finetuning.protocols import PROTOCOLS, make_protocol


def test_frozen_then_unfrozen_lr_schedule() -> None:
    settings = resolve_settings({"protocol": "frozen_then_unfrozen", "freeze_epochs": 10})
    protocol = make_protocol(settings)
    plans = [protocol.plan(epoch) for epoch in range(1, 17)]
    assert [p.train_backbone for p in plans] == [False] * 10 + [True] * 6
    assert [p.lr_factor["head"] for p in plans[:10]] == [1.0] * 10
    assert [p.lr_factor["backbone"] for p in plans[:10]] == [0.0] * 10
    ramp = [p.lr_factor["backbone"] for p in plans[10:]]
    assert ramp == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert [p.lr_factor["head"] for p in plans[10:]] == ramp
    assert protocol.earliest_stop() == 11


def test_full_and_linear_plans() -> None:
    full = make_protocol(resolve_settings({"protocol": "full"}))
    linear = make_protocol(resolve_settings({"protocol": "linear"}))
    assert full.plan(1).train_backbone and full.trains_backbone_ever()
    assert not linear.plan(5).train_backbone and not linear.trains_backbone_ever()
    assert linear.plan(1).lr_factor == {"backbone": 0.0, "head": 1.0}
    assert full.earliest_stop() == linear.earliest_stop() == 1


def test_registry_names_each_protocol_by_its_own_name() -> None:
    assert all(cls.name == name for name, cls in PROTOCOLS.items())
    with pytest.raises(UnknownNameError, match="did you mean 'linear'"):
        make_protocol({"protocol": "linaer"})
