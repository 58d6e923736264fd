"""Importing a checkpoint: safe reading, loud refusals, and the defaults the schema documents."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torchvision.models import resnet18

from medssl.core.registry import UnknownNameError
from medssl.models.importing import (
    IMPORT_DEFAULTS,
    CheckpointImportError,
    import_checkpoint,
    import_encoder,
    read_checkpoint,
)
from medssl.pipeline.config import SCHEMA_PATH
from tests.models.layouts import Payload, moco


def _import_defaults_in_schema() -> dict:
    """The defaults the schema gives an init with source import."""
    inits = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]["inits"]["additionalProperties"]
    (branch,) = [
        rule["then"]["properties"]
        for rule in inits["allOf"]
        if rule["if"]["properties"]["source"] == {"const": "import"}
    ]
    return {key: spec["default"] for key, spec in branch.items() if "default" in spec}


@pytest.mark.parametrize("key", ["backbone", "stem"])
def test_import_defaults_equal_the_schema(key: str) -> None:
    assert _import_defaults_in_schema()[key] == IMPORT_DEFAULTS[key]


def test_every_schema_default_has_a_code_default() -> None:
    assert set(_import_defaults_in_schema()) <= set(IMPORT_DEFAULTS)


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
    torch.save(moco(resnet18().state_dict()), path)
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


def test_unknown_format_names_the_file_and_the_close_one(tmp_path: Path) -> None:
    path = tmp_path / "x.pth"
    with pytest.raises(UnknownNameError, match=r"x\.pth: unknown checkpoint format 'swav2'"):
        import_encoder(path, "swav2")


def test_import_writes_encoder_and_report(tmp_path: Path, one_thread) -> None:
    torch.manual_seed(0)
    path = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), path)
    out = tmp_path / "init" / "encoder.pt"
    info = import_checkpoint(path, "torchvision", out, backbone="resnet18", stem="repeat")
    assert info["method"] == "import:torchvision" and out.exists()
    assert info["import_report"]["n_tensors"] == len(torch.load(out, weights_only=True))
    assert info["provenance"]["settings"] == {
        "format": "torchvision",
        "backbone": "resnet18",
        "stem": "repeat",
        "in_channels": 1,
    }


def test_checkpoint_with_pickled_code_is_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "tampered.pth"
    torch.save({"state_dict": resnet18().state_dict(), "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointImportError, match=r"tampered\.pth: refused.*system"):
        read_checkpoint(path)
    assert not marker.exists()


def test_not_a_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointImportError, match=r"notes\.pth: not a readable torch checkpoint"):
        read_checkpoint(path)
    with pytest.raises(CheckpointImportError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.pth")


def test_transformer_import_reads_back_at_its_size(tmp_path: Path, one_thread) -> None:
    """A DINOv2 ViT imported for 56 px: the encoder file rebuilds the same network."""
    from medssl.models.backbones import load_encoder

    out = tmp_path / "d" / "encoder.pt"
    path, fmt, backbone = _dinov2_file(tmp_path)
    vit, report = import_encoder(path, fmt, backbone, img_size=56)
    info = import_checkpoint(path, fmt, out, backbone, img_size=56)
    loaded, _ = load_encoder(out)
    assert "padding" not in report and info["provenance"]["settings"]["img_size"] == 56
    x = torch.randn(1, 1, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), vit.eval()(x))


def _dinov2_file(tmp_path: Path) -> tuple[Path, str, str]:
    import timm

    torch.manual_seed(0)
    source = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56
    )
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(source.state_dict() | {"mask_token": torch.zeros(1, 384)}, path)
    return path, "dinov2", "vit_small_patch14_dinov2"
