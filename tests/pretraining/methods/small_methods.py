"""Methods narrowed to CPU size and synthetic CT slices to train them on."""

from __future__ import annotations

import numpy as np
import torch

from medssl.datasets import synthetic as synth
from medssl.models import backbones as models
from medssl.pretraining.methods import build_method

SMALL: dict[str, dict] = {
    "barlow_twins": {"proj_dims": [64, 64, 64]},
    "byol": {"hidden_dim": 64, "proj_dim": 32},
    "moco_v2": {"queue_size": 64, "temperature": 0.2},
    "swav": {
        "hidden_dim": 64,
        "n_prototypes": 8,
        "n_local_crops": 2,
        "freeze_prototypes_iters": 0,
        "epsilon": 0.05,
    },
}
"""The official heads, narrowed to CPU size; every other setting is the default."""


def make(name: str, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method(
        name, models.build_backbone("resnet_small", 1), {**SMALL[name], **overrides}
    )


SMALL_HEADS: dict[str, dict] = {
    "barlow_twins": {"proj_dims": [64, 64, 64]},
    "byol": {"hidden_dim": 64, "proj_dim": 32},
    "moco_v2": {"queue_size": 64},
    "swav": {"hidden_dim": 64, "n_prototypes": 16, "n_local_crops": 2},
}
"""CPU-sized overrides of the official head widths, so each test takes a second."""


def ct_slices() -> torch.Tensor:
    """16 synthetic CT slices of 32x32 (HU / 1000) from the project's phantom."""
    volume = synth.make_volume(np.random.default_rng(0), 16, 32)
    return torch.from_numpy(volume.hu / 1000.0).float().unsqueeze(1)


SPARK_SMALL = {"decoder_width": 32}
"""SparK's decoder narrowed to CPU size."""


def spark(backbone: str = "resnet_small", seed: int = 0, **settings: object) -> torch.nn.Module:
    """A SparK method on ``backbone`` with a narrow decoder, from torch seed ``seed``."""
    torch.manual_seed(seed)
    return build_method("spark", models.build_backbone(backbone, 1), {**SPARK_SMALL, **settings})
