"""SwAV, MoCo, BYOL and Barlow Twins losses against slow references written from the papers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssl.pretraining.methods.losses import (
    barlow_twins,
    byol_regression,
    info_nce,
    sinkhorn_knopp,
    swapped_prediction,
)


def reference_sinkhorn(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """Alternate row (prototype) and column (sample) normalisation with explicit loops."""
    n, k = scores.shape
    q = [[math.exp(float(scores[i, j]) / epsilon) for i in range(n)] for j in range(k)]
    total = sum(sum(row) for row in q)
    q = [[value / total for value in row] for row in q]
    for _ in range(iterations):
        for j in range(k):
            row_sum = sum(q[j])
            q[j] = [value / row_sum / k for value in q[j]]
        for i in range(n):
            col_sum = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / col_sum / n
    return np.array([[q[j][i] * n for j in range(k)] for i in range(n)])


def reference_swapped(scores: list[np.ndarray], codes: list[np.ndarray], t: float) -> float:
    total = 0.0
    for i, code in enumerate(codes):
        terms = []
        for v, score in enumerate(scores):
            if v == i:
                continue
            per_sample = []
            for n in range(score.shape[0]):
                logits = [float(x) / t for x in score[n]]
                log_norm = math.log(sum(math.exp(x) for x in logits))
                per_sample.append(
                    -sum(c * (x - log_norm) for c, x in zip(code[n], logits, strict=True))
                )
            terms.append(sum(per_sample) / len(per_sample))
        total += sum(terms) / len(terms)
    return total / len(codes)


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / math.sqrt(float(np.dot(vector, vector)))


def reference_info_nce(q: np.ndarray, k: np.ndarray, queue: np.ndarray, t: float) -> float:
    total = 0.0
    for qi, ki in zip(q, k, strict=True):
        qi, ki = unit(qi.astype(np.float64)), unit(ki.astype(np.float64))
        positive = math.exp(float(np.dot(qi, ki)) / t)
        negatives = sum(math.exp(float(np.dot(qi, m)) / t) for m in queue.astype(np.float64))
        total += -math.log(positive / (positive + negatives))
    return total / len(q)


def reference_barlow(z1: np.ndarray, z2: np.ndarray, lam: float, eps: float = 1e-5) -> float:
    n, d = z1.shape

    def standardise(z: np.ndarray, j: int) -> list[float]:
        column = [float(z[b, j]) for b in range(n)]
        mean = sum(column) / n
        var = sum((x - mean) ** 2 for x in column) / n
        return [(x - mean) / math.sqrt(var + eps) for x in column]

    a = [standardise(z1, j) for j in range(d)]
    b = [standardise(z2, j) for j in range(d)]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][s] * b[j][s] for s in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lam * c**2
    return loss


@pytest.mark.parametrize("iterations", [0, 1, 3])
@pytest.mark.parametrize("shape", [(4, 3), (6, 10)])
def test_sinkhorn_matches_loops(iterations: int, shape: tuple[int, int]) -> None:
    scores = torch.rand(*shape, generator=torch.Generator().manual_seed(iterations)) * 2 - 1
    codes = sinkhorn_knopp(scores, 0.5, iterations)
    expected = reference_sinkhorn(scores.double().numpy(), 0.5, iterations)
    np.testing.assert_allclose(codes.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_sinkhorn_codes_are_equipartitioned_and_stable_at_small_epsilon() -> None:
    """After the last (column) step each sample's codes sum to 1; prototype masses approach N/K."""
    scores = torch.nn.functional.normalize(torch.randn(64, 8), dim=1)
    scores = scores @ torch.nn.functional.normalize(torch.randn(16, 8), dim=1).T
    codes = sinkhorn_knopp(scores, 0.05, 3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64))
    assert codes.sum(dim=0).std() < sinkhorn_knopp(scores, 0.05, 0).sum(dim=0).std()


def test_swapped_prediction_matches_loops() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = [torch.randn(5, 7, generator=generator) for _ in range(4)]
    codes = [sinkhorn_knopp(s, 0.05, 3) for s in scores[:2]]
    loss = swapped_prediction(scores, codes, 0.1)
    expected = reference_swapped([s.numpy() for s in scores], [c.numpy() for c in codes], 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_swapped_prediction_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="crops"):
        swapped_prediction([torch.randn(2, 3)], [torch.rand(2, 3)], 0.1)
    with pytest.raises(ValueError, match="temperature"):
        swapped_prediction([torch.randn(2, 3)] * 2, [torch.rand(2, 3)], 0.0)


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_matches_reference(temperature: float) -> None:
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    queue = torch.nn.functional.normalize(torch.randn(11, 8, generator=generator), dim=1)
    expected = reference_info_nce(q.numpy(), k.numpy(), queue.numpy(), temperature)
    assert info_nce(q, k, queue, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_gradient_reaches_query_only() -> None:
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    info_nce(q, k, torch.nn.functional.normalize(torch.randn(9, 8), dim=1), 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None
    with pytest.raises(ValueError, match="queue"):
        info_nce(q, k, torch.randn(9, 7), 0.2)


def test_byol_regression_is_two_minus_two_cosine() -> None:
    generator = torch.Generator().manual_seed(2)
    p, z = torch.randn(5, 6, generator=generator), torch.randn(5, 6, generator=generator)
    expected = np.mean(
        [
            2 - 2 * float(np.dot(unit(a.astype(np.float64)), unit(b.astype(np.float64))))
            for a, b in zip(p.numpy(), z.numpy(), strict=True)
        ]
    )
    assert byol_regression(p, z).item() == pytest.approx(expected, rel=1e-5)
    assert byol_regression(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_regression(p, -p).item() == pytest.approx(4.0, rel=1e-6)


@pytest.mark.parametrize("lam", [0.0051, 1.0])
def test_barlow_twins_matches_explicit_sums(lam: float) -> None:
    generator = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(7, 5, generator=generator), torch.randn(7, 5, generator=generator)
    expected = reference_barlow(z1.double().numpy(), z2.double().numpy(), lam)
    assert barlow_twins(z1, z2, lam).item() == pytest.approx(expected, rel=1e-5)


def test_barlow_twins_is_near_zero_for_identical_decorrelated_views() -> None:
    """Orthogonal, standardised columns give C = I: the loss vanishes (up to BN's eps)."""
    data = torch.randn(64, 4, dtype=torch.float64)
    # QR of centred data: orthonormal columns that stay orthogonal to the ones vector.
    z = torch.linalg.qr(data - data.mean(dim=0))[0] * 8.0
    assert barlow_twins(z, z, 0.0051).item() < 1e-6
    assert barlow_twins(z, torch.randn(64, 4, dtype=torch.float64), 0.0051).item() > 1.0


def test_float32_under_autocast() -> None:
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    queue = torch.nn.functional.normalize(torch.randn(10, 16), dim=1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        values = [
            barlow_twins(z1, z2, 0.0051),
            byol_regression(z1, z2),
            info_nce(z1, z2, queue, 0.2),
            swapped_prediction([z1, z2], [sinkhorn_knopp(z1, 0.05, 3)], 0.1),
        ]
    assert all(v.dtype == torch.float32 for v in values)
    assert values[0].item() == pytest.approx(barlow_twins(z1, z2, 0.0051).item(), rel=1e-6)
