"""Importing published checkpoints: every format's key layout, refusals, the stage's CLI."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18, resnet50

from medssl.models import backbones as models
from medssl.models.checkpoint_formats import FORMATS, format_names, map_state_dict
from medssl.pipeline.config import load_schema
from medssl.models.importing import CheckpointImportError, import_encoder, main, read_checkpoint

State = dict[str, torch.Tensor]


def _prefixed(state: State, prefix: str, with_fc: bool = True) -> State:
    return {prefix + k: v for k, v in state.items() if with_fc or not k.startswith("fc.")}


def _moco(state: State) -> dict:
    """facebookresearch/moco: query and key encoders, a 128-d MLP head, the queue."""
    inner = _prefixed(state, "module.encoder_q.", with_fc=False)
    inner |= {
        "module.encoder_q.fc.0.weight": torch.randn(16, 512),
        "module.encoder_q.fc.2.weight": torch.randn(8, 16),
        "module.encoder_k.conv1.weight": torch.randn(64, 3, 7, 7),
        "module.queue": torch.randn(8, 32),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    return {"epoch": 200, "arch": "resnet50", "state_dict": inner, "optimizer": {"state": {}}}


def _swav(state: State, prototypes: str = "module.prototypes.weight") -> State:
    """facebookresearch/swav: a bare DataParallel state dict with projection head and prototypes."""
    return _prefixed(state, "module.", with_fc=False) | {
        "module.projection_head.0.weight": torch.randn(16, 512),
        "module.projection_head.1.running_mean": torch.randn(16),
        prototypes: torch.randn(30, 8),
    }


def _pycontrast(state: State, jigsaw: bool = False) -> dict:
    """HobbitLong/PyContrast: {'model', 'model_ema', 'opt', ...}, backbone under module.encoder."""
    model = _prefixed(state, "module.encoder.", with_fc=False)
    model["module.head.0.weight"] = torch.randn(8, 512)
    if jigsaw:
        model["module.head_jig.fc1.weight"] = torch.randn(8, 512)
    return {
        "model": model,
        "model_ema": _prefixed(state, "encoder.", with_fc=False),
        "opt": argparse.Namespace(arch="resnet50", lr=0.03),
        "epoch": 200,
    }


LAYOUTS: dict[str, Callable[[State], object]] = {
    "torchvision": lambda s: dict(s),
    "timm": lambda s: {"state_dict": _prefixed(s, "module."), "epoch": 3, "arch": "resnet50"},
    "moco_v1": _moco,
    "moco_v2": _moco,
    "pcl_v1": _moco,
    "pcl_v2": _moco,
    "swav": _swav,
    "deepcluster_v2": lambda s: _swav(s, "module.prototypes.prototypes0.weight"),
    "sela_v2": lambda s: _swav(s, "module.prototypes.prototypes1.weight"),
    "barlow_twins": lambda s: _prefixed(s, "", with_fc=False),
    "byol": lambda s: dict(s),
    "simclr_v1": lambda s: {"state_dict": dict(s)},
    "simclr_v2": lambda s: {"state_dict": dict(s)},
    "insdis": _pycontrast,
    "pirl": lambda s: _pycontrast(s, jigsaw=True),
    "infomin": _pycontrast,
    "dino": lambda s: _prefixed(s, "", with_fc=False),
    "inat2021": lambda s: {
        "state_dict": _prefixed(s, "module.") | {"module.fc.weight": torch.randn(10000, 512)},
        "epoch": 90,
    },
    "spark": lambda s: _prefixed(s, "", with_fc=False),
}


def test_every_format_has_a_layout_and_a_schema_entry() -> None:
    assert sorted(LAYOUTS) == format_names()
    schema = load_schema()["properties"]["inits"]["additionalProperties"]["properties"]
    assert sorted(schema["format"]["enum"]) == format_names()


@pytest.fixture(scope="module")
def reference() -> State:
    """One random ResNet-18's weights, shared by the layout tests."""
    torch.manual_seed(0)
    return resnet18().state_dict()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_publisher_layout_fills_the_backbone(name: str, reference: State, tmp_path: Path) -> None:
    """Written to a file and read back as the stage reads it; only the classifier is missing.

    ResNet-18 keeps the tests fast: every layout differs from torchvision's by
    prefixes and containers only, which do not depend on the depth.
    """
    path = tmp_path / f"{name}.pth"
    torch.save(LAYOUTS[name](reference), path)
    mapped = map_state_dict(read_checkpoint(path), name)
    model = resnet18()
    result = model.load_state_dict(mapped.state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, reference[key]), key


def test_renames_apply_after_stripping(monkeypatch) -> None:
    from medssl.models.checkpoint_formats import CheckpointFormat

    monkeypatch.setitem(
        FORMATS,
        "renamed",
        CheckpointFormat("test", optional_prefix="net.", renames=((r"^stem\.", "conv1."),)),
    )
    mapped = map_state_dict(
        {"net.stem.weight": torch.ones(1), "net.fc.bias": torch.ones(1)}, "renamed"
    )
    assert list(mapped.state) == ["conv1.weight"]
    assert mapped.dropped == ["fc.bias"]


def test_resnet50_import_through_the_cli(tmp_path: Path, one_thread) -> None:
    """MoCo v2 into a ResNet-50 with the summed stem: the encoder equals the source network."""
    torch.manual_seed(0)
    source = resnet50().eval()
    checkpoint = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(_moco(source.state_dict()), checkpoint)
    out = tmp_path / "init" / "encoder.pt"
    argv = ["--checkpoint", str(checkpoint), "--format", "moco_v2", "--stem", "sum"]
    assert main([*argv, "--out", str(out)]) == 0
    encoder, info = models.load_encoder(out)
    assert info["backbone"] == "resnet50" and info["in_channels"] == 1
    assert info["method"] == "import:moco_v2" and len(info["source"]["sha256"]) == 64
    assert info["import_report"]["missing"] == ["fc.weight", "fc.bias"]
    grey = torch.rand(2, 1, 64, 64)
    source.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = source(grey.expand(-1, 3, -1, -1))
        torch.testing.assert_close(encoder.eval()(grey), expected, rtol=1e-4, atol=1e-4)


def test_missing_backbone_key_fails_loudly(tmp_path: Path) -> None:
    state = resnet18().state_dict()
    del state["layer4.1.bn2.weight"]
    path = tmp_path / "cut.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointImportError, match=r"cut\.pth.*layer4\.1\.bn2\.weight"):
        import_encoder(path, "torchvision", backbone="resnet18")


def test_wrong_format_fails_loudly(tmp_path: Path) -> None:
    """A MoCo file declared as SwAV leaves encoder_q.* unexpected instead of loading nothing."""
    path = tmp_path / "moco.pth"
    torch.save(_moco(resnet18().state_dict()), path)
    with pytest.raises(CheckpointImportError, match="unexpected"):
        import_encoder(path, "swav", backbone="resnet50")
    with pytest.raises(
        CheckpointImportError, match=r"no backbone tensor found under 'module\.encoder\.'"
    ):
        import_encoder(path, "infomin", backbone="resnet50")


def test_architecture_not_released_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(CheckpointImportError, match="released for"):
        import_encoder(path, "moco_v2", backbone="resnet18")


class _Payload:
    """Unpickling this calls os.system: what a tampered checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "tampered.pth"
    state = resnet18().state_dict()
    torch.save({"state_dict": state, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointImportError, match=r"tampered\.pth: refused.*system"):
        read_checkpoint(path)
    out = tmp_path / "encoder.pt"
    with pytest.raises(SystemExit, match="refused"):
        main(
            [
                "--checkpoint",
                str(path),
                "--format",
                "timm",
                "--backbone",
                "resnet18",
                "--out",
                str(out),
            ]
        )
    assert not marker.exists() and not out.exists()


def test_not_a_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointImportError, match=r"notes\.pth: not a readable torch checkpoint"):
        read_checkpoint(path)
    with pytest.raises(CheckpointImportError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.pth")
