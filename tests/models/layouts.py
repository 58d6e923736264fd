"""Publishers' checkpoint layouts, rebuilt around a torchvision state dict for the tests."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch

State = dict[str, torch.Tensor]
"""A torchvision ResNet state dict."""


def prefixed(state: State, prefix: str, with_fc: bool = True) -> State:
    return {prefix + k: v for k, v in state.items() if with_fc or not k.startswith("fc.")}


def moco(state: State) -> dict:
    """facebookresearch/moco: query and key encoders, a 128-d MLP head, the queue."""
    inner = prefixed(state, "module.encoder_q.", with_fc=False)
    inner |= {
        "module.encoder_q.fc.0.weight": torch.randn(16, 512),
        "module.encoder_q.fc.2.weight": torch.randn(8, 16),
        "module.encoder_k.conv1.weight": torch.randn(64, 3, 7, 7),
        "module.queue": torch.randn(8, 32),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    return {"epoch": 200, "arch": "resnet50", "state_dict": inner, "optimizer": {"state": {}}}


def swav(state: State, prototypes: str = "module.prototypes.weight") -> State:
    """facebookresearch/swav: a bare DataParallel state dict with projection head and prototypes."""
    return prefixed(state, "module.", with_fc=False) | {
        "module.projection_head.0.weight": torch.randn(16, 512),
        "module.projection_head.1.running_mean": torch.randn(16),
        prototypes: torch.randn(30, 8),
    }


def pycontrast(state: State, jigsaw: bool = False) -> dict:
    """HobbitLong/PyContrast: {'model', 'model_ema', 'opt', ...}, backbone under module.encoder."""
    model = prefixed(state, "module.encoder.", with_fc=False)
    model["module.head.0.weight"] = torch.randn(8, 512)
    if jigsaw:
        model["module.head_jig.fc1.weight"] = torch.randn(8, 512)
    return {
        "model": model,
        "model_ema": prefixed(state, "encoder.", with_fc=False),
        "opt": argparse.Namespace(arch="resnet50", lr=0.03),
        "epoch": 200,
    }


LAYOUTS: dict[str, Callable[[State], object]] = {
    "torchvision": lambda s: dict(s),
    "timm": lambda s: {"state_dict": prefixed(s, "module."), "epoch": 3, "arch": "resnet50"},
    "moco_v1": moco,
    "moco_v2": moco,
    "pcl_v1": moco,
    "pcl_v2": moco,
    "swav": swav,
    "deepcluster_v2": lambda s: swav(s, "module.prototypes.prototypes0.weight"),
    "sela_v2": lambda s: swav(s, "module.prototypes.prototypes1.weight"),
    "barlow_twins": lambda s: prefixed(s, "", with_fc=False),
    "byol": lambda s: dict(s),
    "simclr_v1": lambda s: {"state_dict": dict(s)},
    "simclr_v2": lambda s: {"state_dict": dict(s)},
    "insdis": pycontrast,
    "pirl": lambda s: pycontrast(s, jigsaw=True),
    "infomin": pycontrast,
    "dino": lambda s: prefixed(s, "", with_fc=False),
    "inat2021": lambda s: {
        "state_dict": prefixed(s, "module.") | {"module.fc.weight": torch.randn(10000, 512)},
        "epoch": 90,
    },
    "spark": lambda s: prefixed(s, "", with_fc=False),
    "radimagenet": lambda s: {"state_dict": sequential(s, "module.backbone.")},
}

TRANSFORMER_FORMATS: tuple[str, ...] = ("biomedclip", "dinov2", "sam")
"""Formats of ViT encoders only: their layouts are in tests/models/test_formats_foundation.py."""

SEQUENTIAL_INDEX = {"conv1.": "0.", "bn1.": "1.", "layer1.": "4.", "layer2.": "5."}
SEQUENTIAL_INDEX |= {"layer3.": "6.", "layer4.": "7."}


def sequential(state: State, prefix: str) -> State:
    """``nn.Sequential(*list(resnet.children())[:-1])``: the children by position, no fc."""
    out = {}
    for key, value in state.items():
        head = next((h for h in SEQUENTIAL_INDEX if key.startswith(h)), None)
        if head is not None:
            out[prefix + SEQUENTIAL_INDEX[head] + key[len(head) :]] = value
    return out


class Payload:
    """Unpickling this calls os.system: what a tampered checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))
