"""``python -m medssl.config``: checks a config file by hand, as the workflow does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_check_cli_accepts_the_default_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "medssl.config", str(REPO / "config.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("valid")


def test_check_cli_reports_problem(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["finetune"]["protocol"] = "ful"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "medssl.config", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "finetune.protocol" in result.stderr and "'full'" in result.stderr
    assert "error: config:" in result.stderr
    assert "Traceback" not in result.stderr
