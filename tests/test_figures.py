"""Stage ``figures``: every kind writes PNG + PDF; a kind missing its options is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from medssl.figures import main
from tests.analysis.frames import figure_efficiency, figure_summary


@pytest.mark.parametrize(
    ("kind", "extra", "table"),
    [
        ("bars", ["--task", "region", "--metric", "auc"], "summary"),
        ("heatmap", ["--fraction", "0.1", "--metrics", "nodule=auc,region=auc"], "summary"),
        ("forest", [], "efficiency"),
    ],
)
def test_cli_writes_png_and_pdf(tmp_path: Path, kind: str, extra: list[str], table: str) -> None:
    path = tmp_path / f"{table}.csv"
    (figure_summary() if table == "summary" else figure_efficiency()).to_csv(path, index=False)
    out = tmp_path / f"{kind}.png"
    assert main([kind, "--table", str(path), "--out", str(out), *extra]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 1000
    assert out.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"


def test_cli_names_missing_arguments(tmp_path: Path, caplog) -> None:
    assert main(["bars", "--table", "x.csv", "--out", str(tmp_path / "b.png")]) == 1
    assert "error: figures: bars needs --task, --metric" in caplog.text
    with pytest.raises(SystemExit) as exit_info:
        main(["pie", "--table", "x.csv", "--out", str(tmp_path / "p.png")])
    assert exit_info.value.code == 2
