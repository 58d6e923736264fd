"""CT augmentation: shapes, reproducibility, per-operation checks, multi-crop and the dataset."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from medssl.pretraining.augment import (
    DEFAULT_AUGMENT,
    CTAugment,
    MultiCrop,
    MultiView,
    MultiViewDataset,
    seed_worker,
)

NO_RANDOMNESS = {
    "crop_scale": [1.0, 1.0],
    "crop_ratio": [1.0, 1.0],
    "flip": False,
    "rotate_degrees": 0.0,
    "intensity_jitter": 0.0,
    "gamma": 0.0,
    "blur_probability": 0.0,
    "noise_std": 0.0,
}


ALWAYS = {**DEFAULT_AUGMENT, "blur_probability": 1.0, "noise_std": 0.1}


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 24, 40), (5, 2, 16, 16)])
@pytest.mark.parametrize("settings", [None, ALWAYS])
def test_shape_and_dtype_preserved(shape: tuple[int, ...], settings: dict | None) -> None:
    image = torch.rand(shape)
    view = CTAugment(settings, seed=1)(image)
    assert view.shape == image.shape and view.dtype == image.dtype
    assert torch.isfinite(view).all()
    double = CTAugment(settings, seed=1)(image.double())
    assert double.dtype == torch.float64


def test_input_is_not_modified() -> None:
    image = torch.rand(1, 32, 32)
    copy = image.clone()
    CTAugment(ALWAYS, seed=0)(image)
    assert torch.equal(image, copy)


def test_two_views_differ() -> None:
    image = torch.rand(1, 32, 32)
    first, second = MultiView(None, n_views=2, seed=0)(image)
    assert first.shape == second.shape == image.shape
    assert not torch.equal(first, second)


def test_reproducible_with_same_seed_and_different_with_another() -> None:
    image = torch.rand(2, 32, 32)
    runs = [MultiView(ALWAYS, seed=seed)(image) for seed in (7, 7, 8)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not torch.equal(runs[0][0], runs[2][0])
    views = MultiView(ALWAYS, seed=7)
    first = views(image)
    views.set_random_state(7)
    assert all(torch.equal(a, b) for a, b in zip(first, views(image), strict=True))


def test_identity_settings_return_the_input() -> None:
    """Whole-slice crop, no flip, rotation or intensity change: the grid hits pixel centres."""
    image = torch.rand(2, 20, 28)
    assert torch.allclose(CTAugment(NO_RANDOMNESS)(image), image, atol=1e-5)


def test_flip_is_horizontal_half_of_the_time() -> None:
    image = torch.rand(1, 16, 16)
    views = CTAugment({**NO_RANDOMNESS, "flip": True}, seed=0)(image.expand(64, 1, 16, 16))
    same = [torch.allclose(view, image, atol=1e-5) for view in views]
    flipped = [torch.allclose(view, torch.flip(image, dims=[-1]), atol=1e-5) for view in views]
    assert all(a != b for a, b in zip(same, flipped, strict=True))
    assert 16 < sum(flipped) < 48


def test_window_jitter_is_affine() -> None:
    """With only the intensity window on, a view is a * x + b for per-view a and b."""
    image = torch.rand(1, 16, 16)
    view = CTAugment({**NO_RANDOMNESS, "intensity_jitter": 0.3}, seed=3)(image)
    design = torch.stack([image.flatten(), torch.ones(image.numel())], dim=1).double()
    solution = torch.linalg.lstsq(design, view.flatten().double().unsqueeze(1)).solution
    residual = design @ solution - view.flatten().double().unsqueeze(1)
    assert residual.abs().max() < 1e-5
    assert not torch.allclose(view, image)


def test_unknown_setting_is_rejected() -> None:
    with pytest.raises(KeyError, match="crop_scal"):
        CTAugment({"crop_scal": [0.5, 1.0]})
    with pytest.raises(ValueError, match="crop_scale"):
        CTAugment({"crop_scale": [0.0, 1.0]})
    with pytest.raises(ValueError, match="intensity_jitter"):
        CTAugment({"intensity_jitter": 1.0})


def test_accepts_the_config_schema_defaults() -> None:
    """The keys and defaults of workflow/schemas/config.schema.yaml's ``augment``."""
    schema_defaults = {
        "crop_scale": [0.3, 1.0],
        "flip": True,
        "rotate_degrees": 10,
        "intensity_jitter": 0.3,
        "gamma": 0.3,
        "blur_probability": 0.3,
        "noise_std": 0.02,
    }
    view = CTAugment(schema_defaults)(torch.rand(1, 32, 32))
    assert view.shape == (1, 32, 32)


def _epoch(dataset: MultiViewDataset, num_workers: int, seed: int) -> list[torch.Tensor]:
    if num_workers == 0:
        dataset.reseed(seed)
    loader = DataLoader(
        dataset,
        batch_size=4,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )
    return [torch.cat(batch) for batch in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_is_reproducible(num_workers: int) -> None:
    # One image repeated: batches can only differ through the augmentation stream.
    images = [torch.rand(1, 32, 32)] * 16
    dataset = MultiViewDataset(images, MultiView(None, n_views=2, seed=0))
    first = _epoch(dataset, num_workers, seed=5)
    second = _epoch(dataset, num_workers, seed=5)
    other = _epoch(dataset, num_workers, seed=6)
    assert len(first) == 4 and first[0].shape == (8, 1, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # With workers, worker 0 makes batches 0 and 2 and worker 1 batches 1 and 3:
    # each worker must have its own stream, not a copy of the other's.
    assert not torch.equal(first[0], first[1])


def test_dataset_drops_labels() -> None:
    pairs = [(torch.rand(1, 8, 8), 1) for _ in range(3)]
    dataset = MultiViewDataset(pairs, MultiView(None, n_views=3))
    views = dataset[0]
    assert len(views) == 3 and all(v.shape == (1, 8, 8) for v in views)
    batch = dataset.__getitems__([0, 2])
    assert len(batch) == 2 and len(batch[0]) == 3


def test_multicrop_views_have_global_then_local_sizes() -> None:
    slices = torch.rand(16, 1, 32, 32)
    crops = MultiCrop({}, n_global=2, n_local=3, local_size=0.5, seed=0)(slices)
    assert [tuple(v.shape) for v in crops] == [(16, 1, 32, 32)] * 2 + [(16, 1, 16, 16)] * 3
    with pytest.raises(ValueError, match="local_size"):
        MultiCrop({}, local_size=1.5)
