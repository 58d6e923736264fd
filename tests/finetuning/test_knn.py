"""The weighted kNN probe: votes, probabilities per task type, chunking, the loop's assessment."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from medssl.finetuning.knn import (
    DEFAULT_K,
    DEFAULT_TEMPERATURE,
    FeatureBank,
    NeighbourClassifier,
    build_bank,
    knn_scores,
    neighbour_classifier,
)
from medssl.finetuning.loop import evaluate
from medssl.finetuning.tasktypes import EvalRows, task_type


def _clusters(n: int, separation: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian clusters in 8 dimensions, centred at +-separation on every axis."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centres = (labels.float() * 2 - 1).unsqueeze(1) * separation
    return centres + torch.randn(n, 8, generator=generator), labels


def _accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((probabilities > 0.5).long() == labels).float().mean())


def _bank(features: torch.Tensor, targets: torch.Tensor, batch: int = 32) -> FeatureBank:
    """A bank through an identity encoder, in batches."""
    pairs = zip(torch.split(features, batch), torch.split(targets, batch), strict=True)
    return build_bank(nn.Identity(), pairs)


def test_separable_clusters_are_classified_and_shuffled_labels_are_chance() -> None:
    train, train_labels = _clusters(200, 2.0, seed=0)
    query, query_labels = _clusters(200, 2.0, seed=1)
    probabilities = knn_scores(_bank(train, train_labels), query, n_outputs=1, task_type="binary")
    assert probabilities.shape == (200,)
    assert _accuracy(probabilities, query_labels) >= 0.98

    shuffled = train_labels[torch.randperm(200, generator=torch.Generator().manual_seed(2))]
    chance = knn_scores(_bank(train, shuffled), query, n_outputs=1, task_type="binary")
    assert abs(_accuracy(chance, query_labels) - 0.5) <= 0.15


def test_votes_are_exp_similarity_over_temperature_normalised() -> None:
    # Unit vectors at known angles to the query (1, 0): cosines 1, 0.6 and 0.
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    bank = FeatureBank(nn.functional.normalize(features, dim=1), torch.tensor([0, 1, 2]))
    query = torch.tensor([[3.0, 0.0]])  # normalised inside: the length must not matter
    got = knn_scores(bank, query, k=2, temperature=0.5, n_outputs=3, task_type="multiclass")
    weights = [math.exp(1.0 / 0.5), math.exp(0.6 / 0.5), 0.0]  # the third is not among the 2
    expected = torch.tensor([weights]) / sum(weights)
    torch.testing.assert_close(got, expected)


def test_chunked_scoring_equals_unchunked() -> None:
    generator = torch.Generator().manual_seed(3)
    features, queries = torch.randn(97, 16, generator=generator), torch.randn(41, 16)
    labels = torch.randint(0, 4, (97,), generator=generator)
    bank = _bank(features, labels, batch=10)
    whole = knn_scores(bank, queries, k=5, n_outputs=4, task_type="multiclass", chunk_size=1000)
    chunked = knn_scores(bank, queries, k=5, n_outputs=4, task_type="multiclass", chunk_size=7)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_multiclass_and_multilabel_give_valid_probabilities() -> None:
    generator = torch.Generator().manual_seed(4)
    features, queries = torch.randn(60, 8, generator=generator), torch.randn(25, 8)
    codes = torch.randint(0, 5, (60,), generator=generator)
    multiclass = knn_scores(_bank(features, codes), queries, n_outputs=5, task_type="multiclass")
    assert multiclass.shape == (25, 5)
    assert bool(((multiclass >= 0) & (multiclass <= 1)).all())
    torch.testing.assert_close(multiclass.sum(1), torch.ones(25))

    bits = (torch.rand(60, 3, generator=generator) < 0.4).float()
    multilabel = knn_scores(_bank(features, bits), queries, n_outputs=3, task_type="multilabel")
    assert multilabel.shape == (25, 3)
    assert bool(((multilabel >= 0) & (multilabel <= 1)).all())
    # A label no training image has gets no votes; one every image has gets all of them.
    bits[:, 0], bits[:, 2] = 0.0, 1.0
    extremes = knn_scores(_bank(features, bits), queries, n_outputs=3, task_type="multilabel")
    torch.testing.assert_close(extremes[:, 0], torch.zeros(25))
    torch.testing.assert_close(extremes[:, 2], torch.ones(25))


def test_k_above_the_bank_is_clamped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    features, labels = _clusters(6, 1.0, seed=5)
    bank = _bank(features, labels)
    with caplog.at_level(logging.WARNING, logger="medssl.finetuning.knn"):
        clamped = knn_scores(bank, features, k=50, n_outputs=1, task_type="binary")
    assert "knn_k = 50 but the training subset has 6 images" in caplog.text
    torch.testing.assert_close(clamped, knn_scores(bank, features, k=6, task_type="binary"))


def test_bad_input_is_refused_clearly() -> None:
    features, labels = _clusters(10, 1.0, seed=6)
    bank = _bank(features, labels)
    with pytest.raises(ValueError, match="cannot score a segmentation task"):
        knn_scores(bank, features, task_type="segmentation")
    with pytest.raises(ValueError, match="knn_k must be an integer >= 1"):
        knn_scores(bank, features, k=0)
    with pytest.raises(ValueError, match="knn_temperature must be > 0"):
        knn_scores(bank, features, temperature=0.0)
    with pytest.raises(ValueError, match="codes 0..1"):
        knn_scores(_bank(features, labels + 1), features, task_type="binary")
    with pytest.raises(ValueError, match="pooled N x D features"):
        build_bank(nn.Identity(), [(torch.zeros(2, 3, 4, 4), torch.zeros(2))])
    with pytest.raises(ValueError, match="feature bank is empty"):
        build_bank(nn.Identity(), [])


@pytest.mark.parametrize(
    ("kind_name", "n_outputs"), [("binary", 1), ("multiclass", 3), ("multilabel", 2)]
)
def test_neighbour_classifier_feeds_the_loops_assessment(kind_name: str, n_outputs: int) -> None:
    """The loop's evaluate() scores the probe like a trained model: same probabilities."""
    generator = torch.Generator().manual_seed(7)
    kind = task_type(kind_name)
    images = torch.randn(48, 1, 2, 4, generator=generator)  # flattened: 8 features
    if kind_name == "multilabel":
        codes = torch.randint(0, 4, (48,), generator=generator)
    else:
        codes = torch.arange(48) % max(2, n_outputs)
    targets = kind.targets(codes, n_outputs)
    backbone = nn.Flatten()
    model = neighbour_classifier(backbone, images[:32], targets[:32], kind_name, n_outputs)
    assert isinstance(model, NeighbourClassifier) and model.backbone is backbone
    assert (model.k, model.temperature) == (DEFAULT_K, DEFAULT_TEMPERATURE)

    expected = knn_scores(
        model.bank, images[32:].flatten(1), n_outputs=n_outputs, task_type=kind_name
    )
    torch.testing.assert_close(kind.probabilities(model(images[32:])), expected, atol=2e-6, rtol=0)
    rows = EvalRows(np.arange(16), np.array([f"p{i}" for i in range(16)]))
    outcome = evaluate(model, images[32:], targets[32:], kind, rows=rows)
    assert 0.0 <= outcome.metrics["auc"] <= 1.0
    assert math.isfinite(outcome.metrics["loss"])
    np.testing.assert_allclose(outcome.arrays["scores"], expected.numpy(), atol=2e-6)
