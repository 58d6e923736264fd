"""Checkpoint formats: each publisher's key layout maps onto torchvision's; a torch-free table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from medssl.core.registry import Registry, UnknownNameError
from medssl.models import checkpoint_formats
from medssl.models.checkpoint_formats import (
    FORMATS,
    CheckpointFormat,
    CheckpointFormatError,
    format_names,
    map_state_dict,
)
from medssl.models.importing import read_checkpoint
from medssl.pipeline.config import load_schema
from tests.models.layouts import LAYOUTS, TRANSFORMER_FORMATS, State


def test_every_format_has_a_layout_and_a_schema_entry() -> None:
    assert sorted([*LAYOUTS, *TRANSFORMER_FORMATS]) == format_names()
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
    renamed = CheckpointFormat("test", optional_prefix="net.", renames=((r"^stem\.", "conv1."),))
    extended = Registry("checkpoint format", {**FORMATS, "renamed": renamed})
    monkeypatch.setattr(checkpoint_formats, "FORMATS", extended)
    mapped = map_state_dict(
        {"net.stem.weight": torch.ones(1), "net.fc.bias": torch.ones(1)}, "renamed"
    )
    assert list(mapped.state) == ["conv1.weight"]
    assert mapped.dropped == ["fc.bias"]


def test_unknown_or_empty_format_is_refused() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'moco_v2'"):
        map_state_dict({}, "mocov2")
    with pytest.raises(CheckpointFormatError, match="no backbone tensor found"):
        map_state_dict({"epoch": 3}, "torchvision")
    with pytest.raises(CheckpointFormatError, match="not a dict of tensors"):
        map_state_dict([torch.ones(1)], "torchvision")


def test_the_table_imports_without_torch() -> None:
    """The config check reads the table while the Snakefile is parsed: no torch there."""
    code = (
        "import sys, medssl.models.checkpoint_formats as f; "
        "assert f.format_names(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    src = Path(checkpoint_formats.__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(src)},
    )
    assert result.returncode == 0, result.stderr
