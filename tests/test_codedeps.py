"""Rules carry a digest of the source files their stage runs, so code edits rerun the right jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from medssl.pipeline.codedeps import module_sources

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "medssl"


def names(stage: str) -> set[str]:
    return {Path(p).relative_to(PACKAGE).as_posix() for p in module_sources(stage)}


def test_finetune_sources_include_its_imports_but_not_other_stages() -> None:
    found = names("finetune")
    assert {"finetune.py", "models.py", "data.py", "__init__.py"} <= found
    assert "pretrain.py" not in found
    assert "convert.py" not in found


def test_pretrain_sources_reach_registered_methods() -> None:
    found = names("pretrain")
    assert {"pretrain.py", "methods/__init__.py", "methods/simclr.py"} <= found
    assert "finetune.py" not in found


def test_unknown_module_is_an_error() -> None:
    with pytest.raises(KeyError, match="medssl.nonexistent"):
        module_sources("nonexistent")
