"""pretraining.optimizers: the registry, LARS and LAMB against their formulas, method recipes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medssl.models import backbones as models
from medssl.pretraining import loop as trainer
from medssl.pretraining import optimizers
from medssl.pretraining.methods import METHODS, build_method
from medssl.pretraining.optimizers import LAMB, LARS

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


def test_barlow_twins_trains_biases_at_its_lower_rate() -> None:
    method = build_method(
        "barlow_twins", models.build_backbone("resnet_small", 1), SMALL["barlow_twins"]
    )
    config = trainer.train_settings({"batch_size": 256}, method.optim_recipe)
    weights, biases = trainer.build_optimizer(method, config).param_groups
    assert weights["lr"] == pytest.approx(0.2) and biases["lr"] == pytest.approx(0.0048)
    assert biases["weight_decay"] == 0.0 and biases["lars_exclude"]


def test_unknown_optimizer_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'; known: adam, adamw, lamb"):
        optimizers.build("adagrad", [], 1.0, {})
    with pytest.raises(KeyError, match="did you mean 'lars'"):
        optimizers.build("lasr", [], 1.0, {})


def test_trust_ratio_falls_back_to_one_for_zero_norms() -> None:
    assert float(optimizers.trust_ratio(torch.zeros(3), torch.ones(3), 0.001)) == 1.0
    assert float(optimizers.trust_ratio(torch.ones(3), torch.zeros(3), 0.001)) == 1.0
    ratio = optimizers.trust_ratio(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0]), 0.5)
    assert float(ratio) == pytest.approx(0.5 * 5 / 2)


def test_lars_step_matches_formula() -> None:
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS(
        [{"params": [weight]}, {"params": [bias], "weight_decay": 0.0, "lars_exclude": True}],
        lr=0.5,
        momentum=0.9,
        weight_decay=0.1,
    )
    weight.grad = torch.tensor([0.0, 1.0])
    bias.grad = torch.tensor([2.0])
    optimizer.step()
    update = torch.tensor([0.0, 1.0]) + 0.1 * torch.tensor([3.0, 4.0])
    trust = 0.001 * 5.0 / float(torch.linalg.vector_norm(update))
    expected = torch.tensor([3.0, 4.0]) - 0.5 * trust * update
    assert torch.allclose(weight.detach(), expected)
    assert torch.allclose(bias.detach(), torch.tensor([1.0 - 0.5 * 2.0]))


def test_lamb_step_matches_formula() -> None:
    """One LAMB step: bias-corrected Adam direction plus decay, scaled by ||w|| / ||r||."""
    weight = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    bias = nn.Parameter(torch.tensor([0.35, -0.2]))
    groups = [
        {"params": [weight], "lars_exclude": False},
        {"params": [bias], "weight_decay": 0.0, "lars_exclude": True},
    ]
    optimizer = LAMB(groups, lr=0.1, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.04)
    grad_w = np.array([[0.3, -0.1], [0.2, 0.4]])
    grad_b = np.array([0.5, -0.5])
    weight.grad = torch.tensor(grad_w, dtype=torch.float32)
    bias.grad = torch.tensor(grad_b, dtype=torch.float32)
    w0, b0 = weight.detach().numpy().astype(np.float64), bias.detach().numpy().astype(np.float64)
    optimizer.step()

    def adam_direction(g: np.ndarray) -> np.ndarray:
        m_hat = (0.1 * g) / (1 - 0.9)
        v_hat = (0.05 * g * g) / (1 - 0.95)
        return m_hat / (np.sqrt(v_hat) + 1e-6)

    r = adam_direction(grad_w) + 0.04 * w0
    expected_w = w0 - 0.1 * (np.linalg.norm(w0) / np.linalg.norm(r)) * r
    expected_b = b0 - 0.1 * adam_direction(grad_b)
    np.testing.assert_allclose(weight.detach().numpy(), expected_w, rtol=1e-5)
    np.testing.assert_allclose(bias.detach().numpy(), expected_b, rtol=1e-5)
