"""Fine-tuning protocols: what trains in which epoch, and at what learning rate.

How the loop obeys them (frozen weights stay frozen, early stopping waits for
the unfrozen backbone) is tested with the loop, in ``test_loop.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medssl.core.registry import UnknownNameError
from medssl.finetuning.loop import resolve_settings
from medssl.finetuning.protocols import KNN, PROTOCOL_SETTING_DEFAULTS, PROTOCOLS, make_protocol


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


def test_knn_trains_nothing_and_has_dinos_defaults() -> None:
    from medssl.finetuning.knn import DEFAULT_K, DEFAULT_TEMPERATURE

    protocol = make_protocol(resolve_settings({"protocol": "knn"}))
    assert protocol.planned_epochs() == 0 and not protocol.trains_backbone_ever()
    assert KNN.setting_defaults == {"knn_k": DEFAULT_K, "knn_temperature": DEFAULT_TEMPERATURE}
    assert PROTOCOL_SETTING_DEFAULTS["knn_k"] == DEFAULT_K
    with pytest.raises(ValueError, match="knn trains nothing"):
        protocol.plan(1)
    full = make_protocol(resolve_settings({"protocol": "full", "epochs": 7}))
    assert full.planned_epochs() == 7
    assert full.model_without_training(nn.Identity(), *[torch.zeros(1)] * 2, "binary", 1) is None


def test_knn_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="knn_k must be an integer >= 1"):
        make_protocol({"protocol": "knn", "knn_k": 0})
    with pytest.raises(ValueError, match="knn_temperature must be > 0"):
        make_protocol({"protocol": "knn", "knn_temperature": -1.0})


def test_knn_answers_with_the_training_subsets_neighbours() -> None:
    """The model it hands the loop votes with the protocol's k and temperature."""
    from medssl.finetuning.knn import NeighbourClassifier

    protocol = make_protocol({"protocol": "knn", "knn_k": 3, "knn_temperature": 0.5})
    model = nn.Module()
    model.backbone = nn.Flatten()
    images, labels = torch.randn(8, 1, 2, 2), torch.arange(8) % 2
    answer = protocol.model_without_training(model, images, labels, "binary", 1)
    assert isinstance(answer, NeighbourClassifier)
    assert (answer.k, answer.temperature, len(answer.bank)) == (3, 0.5, 8)
    with pytest.raises(ValueError, match="cannot score a segmentation task"):
        protocol.model_without_training(model, images, labels, "segmentation", 1)
