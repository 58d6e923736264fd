"""The workflow stays lint-clean and formatted, as `make lint` checks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True)


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; run `pip install -e '.[dev]'`")
    return found


def test_snakemake_lint_is_clean() -> None:
    result = run(sys.executable, "-m", "snakemake", "--lint")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Lints for" not in output, output


def test_snakefiles_are_snakefmt_formatted() -> None:
    result = run(tool("snakefmt"), "--check", "Snakefile", "workflow")
    assert result.returncode == 0, result.stdout + result.stderr


def test_python_is_ruff_clean() -> None:
    result = run(tool("ruff"), "check", "src", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr
