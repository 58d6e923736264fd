"""Stage ``import_init``: a publisher's file through the command line; failures are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18, resnet50

from medssl import import_init
from medssl.models import backbones as models
from tests.models.layouts import Payload, moco


def test_resnet50_import_through_the_cli(tmp_path: Path, one_thread) -> None:
    """MoCo v2 into a ResNet-50 with the summed stem: the encoder equals the source network."""
    torch.manual_seed(0)
    source = resnet50().eval()
    checkpoint = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(moco(source.state_dict()), checkpoint)
    out = tmp_path / "init" / "encoder.pt"
    argv = ["--checkpoint", str(checkpoint), "--format", "moco_v2", "--stem", "sum"]
    assert import_init.main([*argv, "--out", str(out)]) == 0
    encoder, info = models.load_encoder(out)
    assert info["backbone"] == "resnet50" and info["in_channels"] == 1
    assert info["method"] == "import:moco_v2" and len(info["source"]["sha256"]) == 64
    assert info["import_report"]["missing"] == ["fc.weight", "fc.bias"]
    grey = torch.rand(2, 1, 64, 64)
    source.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = source(grey.expand(-1, 3, -1, -1))
        torch.testing.assert_close(encoder.eval()(grey), expected, rtol=1e-4, atol=1e-4)


def test_pickled_code_is_one_error_line_and_runs_nothing(tmp_path: Path, caplog) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "tampered.pth"
    torch.save({"state_dict": resnet18().state_dict(), "extra": Payload(marker)}, path)
    out = tmp_path / "encoder.pt"
    argv = ["--checkpoint", str(path), "--format", "timm", "--backbone", "resnet18"]
    assert import_init.main([*argv, "--out", str(out)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("error: import_init: ")
    assert "refused" in errors[0]
    assert not marker.exists() and not out.exists()


def test_unknown_format_or_stem_is_a_usage_error(tmp_path: Path, capsys) -> None:
    argv = ["--checkpoint", str(tmp_path / "x.pth"), "--out", str(tmp_path / "e.pt")]
    with pytest.raises(SystemExit) as exit_info:
        import_init.main([*argv, "--format", "mocov2"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        import_init.main([*argv, "--format", "moco_v2", "--stem", "average"])
