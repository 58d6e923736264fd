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


def test_exempt_from_decay_moves_named_parameters_and_keeps_group_options() -> None:
    weight, other, bias = (nn.Parameter(torch.ones(2, 2)) for _ in range(3))
    groups = [
        {"params": [weight, other], "lars_exclude": False, "lr_scale": 0.5},
        {"params": [bias], "weight_decay": 0.0, "lars_exclude": True},
    ]
    result = optimizers.exempt_from_decay(groups, [other, bias])
    assert [[id(p) for p in g["params"]] for g in result] == [[id(weight)], [id(other)], [id(bias)]]
    assert result[0] == {"params": [weight], "lars_exclude": False, "lr_scale": 0.5}
    assert result[1] == {
        "params": [other],
        "lars_exclude": True,
        "lr_scale": 0.5,
        "weight_decay": 0.0,
    }
    assert optimizers.exempt_from_decay(groups, []) == groups


@pytest.mark.parametrize("name", ["lamb", "lars", "adamw", "sgd"])
def test_spark_mask_tokens_get_no_decay_under_every_optimizer(name: str) -> None:
    """Mask tokens sit in a zero-decay, trust-ratio-free group; the decay schedule skips it."""
    torch.manual_seed(0)
    method = build_method("spark", models.build_backbone("resnet_small", 1), SMALL["spark"])
    config = trainer.train_settings({"optimizer": name, "batch_size": 8}, method.optim_recipe)
    optimizer = trainer.build_optimizer(method, config)
    tokens = {id(t) for t in method.mask_tokens}
    for group in optimizer.param_groups:
        held = {id(p) for p in group["params"]} & tokens
        if held:
            assert group["weight_decay"] == 0.0 and group["lars_exclude"]
    assert tokens <= {
        id(p) for g in optimizer.param_groups if g["lars_exclude"] for p in g["params"]
    }
    trainer.set_weight_decay(optimizer, 0.2)
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups if g["lars_exclude"])


def test_spark_mask_token_lamb_step_is_a_plain_adam_step() -> None:
    """One LAMB step on a mask token equals Adam's bias-corrected step by hand, without decay."""
    torch.manual_seed(0)
    method = build_method("spark", models.build_backbone("resnet_small", 1), SMALL["spark"])
    config = trainer.train_settings({"batch_size": 256}, method.optim_recipe)
    optimizer = trainer.build_optimizer(method, config)
    lr, (beta1, beta2), eps = 1e-3, (0.9, 0.95), 1e-6
    for group in optimizer.param_groups:
        group["lr"] = lr
    trainer.set_weight_decay(optimizer, 0.2)
    token = method.mask_tokens[0]
    before = token.detach().clone().double()
    grad = torch.linspace(-1.0, 2.0, token.numel()).view_as(token)
    for param in method.parameters():
        param.grad = torch.zeros_like(param)
    token.grad = grad.clone()
    optimizer.step()
    g = grad.double()
    m_hat = (1 - beta1) * g / (1 - beta1)
    v_hat = (1 - beta2) * g * g / (1 - beta2)
    expected = before - lr * m_hat / (v_hat.sqrt() + eps)
    torch.testing.assert_close(token.detach().double(), expected, rtol=0, atol=1e-7)
    # The trust ratio and the decay would have given a different step.
    decayed = m_hat / (v_hat.sqrt() + eps) + 0.2 * before
    scaled = before - lr * decayed * before.norm() / decayed.norm()
    assert not torch.allclose(token.detach().double(), scaled, atol=1e-7)
