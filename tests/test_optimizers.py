"""Optimiser registry, per-method recipes, schedules and the per-rank data order."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.models import backbones as models
from medssl.pretraining import optimizers
from medssl.pretraining import loop as trainer
from medssl.pretraining.methods import METHODS, build_method
from medssl.pretraining.recipes import split_method_settings

SMALL = {
    "barlow_twins": {"proj_dims": [16, 16, 16]},
    "byol": {"hidden_dim": 16, "proj_dim": 8},
    "moco_v2": {"queue_size": 16},
    "simclr": {"proj_dim": 8},
    "spark": {"decoder_width": 32},
    "swav": {"hidden_dim": 16, "n_prototypes": 4},
}


def test_every_method_has_a_recipe_the_registry_builds() -> None:
    assert set(SMALL) == set(METHODS)
    classes = {"lars": optimizers.LARS, "lamb": optimizers.LAMB, "sgd": torch.optim.SGD}
    expected = {
        "simclr": ("lars", 0.3),
        "swav": ("lars", 0.3),
        "barlow_twins": ("lars", 0.2),
        "byol": ("lars", 0.2),
        "moco_v2": ("sgd", 0.03),
        "spark": ("lamb", 2e-4),
    }
    for name, settings in SMALL.items():
        method = build_method(name, models.build_backbone("resnet_small", 1), settings)
        config = trainer.train_settings({"batch_size": 512}, method.optim_recipe)
        assert (config["optimizer"], config["lr"]) == expected[name]
        optimizer = trainer.build_optimizer(method, config)
        assert type(optimizer) is classes[config["optimizer"]]
        # Linear scaling: the recipe's lr is per 256 images.
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2 * expected[name][1])


def test_settings_override_the_recipe_and_null_counts() -> None:
    recipe = {"optimizer": "lamb", "lr": 2e-4, "grad_clip": 5.0, "weight_decay_end": 0.2}
    config = trainer.train_settings({"lr": 0.01, "grad_clip": None}, recipe)
    assert config["optimizer"] == "lamb" and config["lr"] == 0.01
    assert config["grad_clip"] is None and config["weight_decay_end"] == 0.2
    assert trainer.train_settings({})["optimizer"] == trainer.TRAINER_DEFAULTS["optimizer"]
    with pytest.raises(KeyError, match="unknown trainer keys"):
        trainer.train_settings({}, {"learning_rate": 1.0})


def test_method_optim_section_overrides_the_shared_keys() -> None:
    settings = {
        "lr": 0.1,
        "optimizer": "adamw",
        "spark": {"mask_ratio": 0.5, "optim": {"lr": 1e-3}},
    }
    method_settings, train = split_method_settings("spark", settings)
    assert method_settings == {"mask_ratio": 0.5}
    assert train["lr"] == 1e-3 and train["optimizer"] == "adamw"
    with pytest.raises(KeyError, match=r"pretrain\.spark\.optim has unknown keys \['epochs'\]"):
        split_method_settings("spark", {"spark": {"optim": {"epochs": 3}}})


def test_barlow_twins_trains_biases_at_its_lower_rate() -> None:
    method = build_method(
        "barlow_twins", models.build_backbone("resnet_small", 1), SMALL["barlow_twins"]
    )
    config = trainer.train_settings({"batch_size": 256}, method.optim_recipe)
    weights, biases = trainer.build_optimizer(method, config).param_groups
    assert weights["lr"] == pytest.approx(0.2) and biases["lr"] == pytest.approx(0.0048)
    assert biases["weight_decay"] == 0.0 and biases["lars_exclude"]


def test_unknown_optimizer_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown optimizer 'adagrad'.*'lamb'"):
        optimizers.build("adagrad", [], 1.0, {})


def test_trust_ratio_falls_back_to_one_for_zero_norms() -> None:
    assert float(optimizers.trust_ratio(torch.zeros(3), torch.ones(3), 0.001)) == 1.0
    assert float(optimizers.trust_ratio(torch.ones(3), torch.zeros(3), 0.001)) == 1.0
    ratio = optimizers.trust_ratio(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0]), 0.5)
    assert float(ratio) == pytest.approx(0.5 * 5 / 2)


def test_cosine_ends_at_the_final_fraction() -> None:
    factor = trainer.warmup_cosine(warmup_steps=2, total_steps=10, final_fraction=0.001)
    assert factor(0) == 0.5 and factor(1) == 1.0
    assert factor(2) == pytest.approx(1.0)
    assert factor(6) == pytest.approx(0.001 + 0.999 * 0.5)
    assert factor(10) == pytest.approx(0.001)


def test_spark_weight_decay_rises_by_a_cosine() -> None:
    values = [trainer.weight_decay_at(step, 11, 0.04, 0.2) for step in range(11)]
    assert values[0] == pytest.approx(0.04) and values[-1] == pytest.approx(0.2)
    assert values[5] == pytest.approx(0.2 + (0.04 - 0.2) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert trainer.weight_decay_at(7, 11, 0.04, None) == 0.04
    groups = [
        {"params": [torch.nn.Parameter(torch.ones(2, 2))], "lars_exclude": False},
        {"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.0, "lars_exclude": True},
    ]
    optimizer = optimizers.build("lamb", groups, 1e-3, {"weight_decay": 0.04})
    trainer.set_weight_decay(optimizer, 0.1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_share_each_global_batch_in_order(world: int) -> None:
    single = trainer.epoch_order(37, 8, seed=3, epoch=2)
    assert len(single) == 32 and len(set(single)) == 32
    shares = [trainer.epoch_order(37, 8, 3, 2, rank, world) for rank in range(world)]
    local = 8 // world
    for step in range(4):
        rebuilt = [i for share in shares for i in share[step * local : (step + 1) * local]]
        assert rebuilt == single[step * 8 : (step + 1) * 8]
    assert trainer.epoch_order(37, 8, 3, 3) != single
