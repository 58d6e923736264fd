"""SimCLR: NT-Xent against a slow reference written directly from the paper's formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssl.pretraining.methods.simclr import nt_xent


def reference_nt_xent(z1: np.ndarray, z2: np.ndarray, temperature: float) -> float:
    """Loop over the 2N anchors; l(i) = -log(exp(s_ij/t) / sum_{k != i} exp(s_ik/t))."""
    embeddings = [np.asarray(v, dtype=np.float64) for v in list(z1) + list(z2)]
    embeddings = [v / math.sqrt(float(np.dot(v, v))) for v in embeddings]
    n = len(z1)
    total = 0.0
    for anchor in range(2 * n):
        positive = anchor + n if anchor < n else anchor - n
        numerator = math.exp(float(np.dot(embeddings[anchor], embeddings[positive])) / temperature)
        denominator = 0.0
        for other in range(2 * n):
            if other != anchor:
                similarity = float(np.dot(embeddings[anchor], embeddings[other]))
                denominator += math.exp(similarity / temperature)
        total += -math.log(numerator / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 2, 5, 16])
def test_matches_reference(temperature: float, batch: int) -> None:
    generator = torch.Generator().manual_seed(batch * 100 + int(temperature * 100))
    z1 = torch.randn(batch, 8, generator=generator)
    z2 = torch.randn(batch, 8, generator=generator)
    expected = reference_nt_xent(z1.numpy(), z2.numpy(), temperature)
    assert nt_xent(z1, z2, temperature).item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_single_pair_has_no_negatives() -> None:
    """With N = 1 each anchor's only candidate is its positive: loss log(1) = 0."""
    z = torch.randn(1, 4)
    assert nt_xent(z, torch.randn(1, 4), 0.1).item() == pytest.approx(0.0, abs=1e-6)


def test_aligned_pairs_have_lower_loss_than_random_pairs() -> None:
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(32, 16, generator=generator)
    aligned = z1 + 0.05 * torch.randn(32, 16, generator=generator)
    unrelated = torch.randn(32, 16, generator=generator)
    assert nt_xent(z1, aligned, 0.1) < nt_xent(z1, unrelated, 0.1)


def test_scale_invariant_and_differentiable() -> None:
    """Embeddings are normalised, so scaling them changes nothing; gradients flow to both."""
    z1 = torch.randn(6, 8, requires_grad=True)
    z2 = torch.randn(6, 8, requires_grad=True)
    loss = nt_xent(z1, z2, 0.2)
    assert loss.item() == pytest.approx(nt_xent(3 * z1, 0.5 * z2, 0.2).item(), rel=1e-5)
    loss.backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0
    assert z2.grad is not None and z2.grad.abs().sum() > 0


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(2, 3), torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError, match="shape"):
        nt_xent(torch.randn(2, 3), torch.randn(3, 3), 0.1)


def test_float32_under_autocast() -> None:
    """Inside a bfloat16 autocast region the loss still equals the float32 value."""
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = nt_xent(z1, z2, 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(nt_xent(z1, z2, 0.1).item(), rel=1e-6)
