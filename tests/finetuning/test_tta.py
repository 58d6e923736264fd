"""Test-time augmentation: each mode averages its views; maps are mirrored back."""

from __future__ import annotations

import pytest
import torch

from medssl.core.registry import UnknownNameError
from medssl.finetuning.tta import TTA_MODES, predict_with_tta, ten_crop_views


def _left_half(x: torch.Tensor) -> torch.Tensor:
    return x[..., :16].mean(dim=(1, 2, 3))


IMAGES = torch.arange(2 * 32 * 32, dtype=torch.float32).reshape(2, 1, 32, 32)


def test_none_and_flip() -> None:
    torch.testing.assert_close(
        predict_with_tta(_left_half, IMAGES, "none", dense=False), _left_half(IMAGES)
    )
    flipped = predict_with_tta(_left_half, IMAGES, "flip", dense=False)
    both = (IMAGES[..., :16].mean(dim=(1, 2, 3)) + IMAGES[..., 16:].mean(dim=(1, 2, 3))) / 2
    torch.testing.assert_close(flipped, both)
    # Dense outputs are mirrored back: a map that copies the image is unchanged.
    torch.testing.assert_close(
        predict_with_tta(lambda x: x[:, 0], IMAGES, "flip", dense=True), IMAGES[:, 0]
    )
    assert not TTA_MODES["none"].augments and TTA_MODES["flip"].augments


def test_ten_crop_averages_its_views() -> None:
    views = ten_crop_views(IMAGES)
    assert len(views) == 10 and all(v.shape == IMAGES.shape for v in views)
    # The last five are the crops of the mirrored image: its top-left is the top-right mirrored.
    torch.testing.assert_close(views[5], views[1].flip(-1))
    corner = torch.nn.functional.interpolate(
        IMAGES, size=(37, 37), mode="bilinear", align_corners=False, antialias=True
    )[..., :32, :32]
    torch.testing.assert_close(views[0], corner)
    averaged = predict_with_tta(_left_half, IMAGES, "ten_crop", dense=False)
    torch.testing.assert_close(averaged, torch.stack([_left_half(v) for v in views]).mean(0))
    with pytest.raises(ValueError, match="classification"):
        predict_with_tta(_left_half, IMAGES, "ten_crop", dense=True)


def test_unknown_mode_names_the_close_one() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'ten_crop'"):
        predict_with_tta(_left_half, IMAGES, "tencrop", dense=False)
