"""Test-time augmentation: average the model's probabilities over fixed views of each image.

* ``none``: the image as it is.
* ``flip``: the image and its left-right mirror.
* ``ten_crop`` (study B): the image is enlarged by :data:`TEN_CROP_ENLARGE`
  (256/224, torchvision's ImageNet evaluation ratio) and cut into the four
  corner crops and the centre crop of the original size, plus the mirror of
  each (torchvision's ``ten_crop``).

Segmentation outputs are maps, so a view's probabilities must be mapped back
onto the image: a mirrored view's map is mirrored back. Crops cannot be put
back without gaps, so ``ten_crop`` is for classification only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as tvf

from medssl.core.registry import Registry

TEN_CROP_ENLARGE = 256 / 224

Predict = Callable[[torch.Tensor], torch.Tensor]
"""Images (N, C, H, W) -> probabilities of the model under test."""


@dataclass(frozen=True)
class TtaMode:
    """One way of averaging over views: ``average(predict, images, dense)``.

    ``augments`` is False for the mode that only predicts the images as they
    are; a caller that already holds those outputs can then skip the forward pass.
    """

    average: Callable[[Predict, torch.Tensor, bool], torch.Tensor]
    augments: bool = True


def ten_crop_views(images: torch.Tensor) -> list[torch.Tensor]:
    """Ten views (N, C, H, W) of a batch, each the size of the input."""
    height, width = images.shape[-2:]
    size = [round(height * TEN_CROP_ENLARGE), round(width * TEN_CROP_ENLARGE)]
    enlarged = tvf.resize(images, size, antialias=True)
    return list(tvf.ten_crop(enlarged, [height, width]))


def _as_is(predict: Predict, images: torch.Tensor, dense: bool) -> torch.Tensor:
    return predict(images)


def _flip(predict: Predict, images: torch.Tensor, dense: bool) -> torch.Tensor:
    mirrored = predict(images.flip(-1))
    return (predict(images) + (mirrored.flip(-1) if dense else mirrored)) / 2


def _ten_crop(predict: Predict, images: torch.Tensor, dense: bool) -> torch.Tensor:
    if dense:
        raise ValueError("tta ten_crop is for classification; use none or flip for segmentation")
    return torch.stack([predict(view) for view in ten_crop_views(images)]).mean(0)


TTA_MODES: Registry[TtaMode] = Registry(
    "test-time augmentation",
    {
        "none": TtaMode(_as_is, augments=False),
        "flip": TtaMode(_flip),
        "ten_crop": TtaMode(_ten_crop),
    },
)
"""The modes by name (``finetune.tta`` in the config)."""


def predict_with_tta(
    predict: Predict, images: torch.Tensor, mode: str, dense: bool
) -> torch.Tensor:
    """Mean of ``predict`` (images -> probabilities) over the views of ``mode``.

    ``dense`` says the probabilities are maps aligned with the image
    (segmentation), which then are mirrored back before averaging.
    """
    return TTA_MODES[mode].average(predict, images, dense)
