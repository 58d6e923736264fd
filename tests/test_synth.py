"""``python -m medssl.synth``: the cohort, its labels and masks from the command line."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from medssl import synth


def test_cli(tmp_path: Path) -> None:
    code = synth.main(
        [
            "--out-dir",
            str(tmp_path / "d"),
            "--labels",
            str(tmp_path / "l.csv"),
            "--settings",
            '{"patients": 1, "slices": 4, "matrix": 16, "series_per_patient": 1}',
            "--masks-dir",
            str(tmp_path / "m"),
        ]
    )
    assert code == 0
    assert len(pd.read_csv(tmp_path / "l.csv")) == 4
    assert len(list((tmp_path / "d").rglob("*.dcm"))) == 5
    assert len(list((tmp_path / "m" / "lung").glob("*.png"))) == 4


def test_bad_settings_are_one_error_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    argv = ["--out-dir", str(tmp_path / "d"), "--labels", str(tmp_path / "l.csv")]
    with caplog.at_level(logging.ERROR):
        assert synth.main([*argv, "--settings", '{"patient": 3}']) == 1
    assert caplog.messages[-1].startswith(
        "error: synth: unknown synthetic setting 'patient'; did you mean 'patients'?"
    )
    assert not (tmp_path / "d").exists() and not (tmp_path / "l.csv").exists()
