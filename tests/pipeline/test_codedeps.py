"""Rules carry a digest of the code their stage runs, so code edits rerun the right jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from medssl.core.registry import UnknownNameError
from medssl.pipeline.codedeps import code_digest, code_fingerprint, module_sources

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "medssl"

CODE = '''"""Module docstring."""

import math


def area(radius: float) -> float:
    """Area of a circle."""
    return math.pi * radius**2  # the formula
'''


def names(*modules: str) -> set[str]:
    return {Path(p).relative_to(PACKAGE).as_posix() for m in modules for p in module_sources(m)}


def test_finetune_sources_include_its_imports_but_not_other_stages() -> None:
    found = names("finetune")
    assert {"finetune.py", "finetuning/loop.py", "datasets/hdf5.py", "__init__.py"} <= found
    assert "pretrain.py" not in found
    assert "convert.py" not in found
    assert not any(name.startswith("pretraining/methods/") for name in found)


def test_pretrain_sources_reach_no_method_module() -> None:
    found = names("pretrain")
    assert {"pretrain.py", "pretraining/loop.py", "pretraining/methods/__init__.py"} <= found
    methods = {"simclr", "swav", "moco_v2", "byol", "barlow_twins", "spark"}
    assert not {f"pretraining/methods/{m}.py" for m in methods} & found
    assert "finetuning/loop.py" not in found


def test_each_method_reaches_only_its_own_module() -> None:
    methods = {"simclr", "swav", "moco_v2", "byol", "barlow_twins", "spark"}
    for method in methods:
        found = names(f"pretraining.methods.{method}")
        assert f"pretraining/methods/{method}.py" in found
        others = {f"pretraining/methods/{m}.py" for m in methods - {method}}
        assert not others & found, method


def test_digest_ignores_comments_docstrings_and_layout(tmp_path: Path) -> None:
    original = tmp_path / "a.py"
    original.write_text(CODE)
    cosmetic = tmp_path / "b.py"
    cosmetic.write_text(
        CODE.replace('"""Area of a circle."""', '"""The area of a circle, in square units."""')
        .replace("  # the formula", "")
        .replace("radius**2", "radius ** 2")
        .replace('"""Module docstring."""', "# a comment instead of a docstring")
        + "\n\n"
    )
    changed = tmp_path / "c.py"
    changed.write_text(CODE.replace("radius**2", "radius**3"))
    assert code_fingerprint(original) == code_fingerprint(cosmetic)
    assert code_fingerprint(original) != code_fingerprint(changed)


def test_digest_sees_a_string_that_is_not_a_docstring(tmp_path: Path) -> None:
    original = tmp_path / "a.py"
    original.write_text('def f():\n    x = "one"\n    return x\n')
    changed = tmp_path / "b.py"
    changed.write_text('def f():\n    x = "two"\n    return x\n')
    assert code_fingerprint(original) != code_fingerprint(changed)


def test_digest_of_several_modules_is_the_digest_of_their_union() -> None:
    assert code_digest("pretrain", "pretraining.methods.simclr") != code_digest("pretrain")
    assert code_digest("subsample", "subsample") == code_digest("subsample")


def test_unknown_module_is_an_error() -> None:
    with pytest.raises(UnknownNameError, match="medssl.nonexistent"):
        module_sources("nonexistent")
