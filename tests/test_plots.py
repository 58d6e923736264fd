"""Stage ``plots``: PNG and PDF written, byte-reproducible."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medssl.analysis.curves import label_efficiency_figure, save_figure
from medssl.plots import main
from tests.analysis.frames import curve_summary


def test_files_written_and_reproducible(tmp_path: Path) -> None:
    summary = tmp_path / "summary.csv"
    curve_summary().to_csv(summary, index=False)
    out = tmp_path / "figures" / "label_efficiency_nodule.png"
    argv = ["--summary", str(summary), "--task", "nodule", "--out", str(out)]
    assert main([*argv, "--settings", '{"confidence": 0.95}']) == 0
    pdf = out.with_suffix(".pdf")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert out.stat().st_size > 1000 and pdf.stat().st_size > 1000
    first = (out.read_bytes(), pdf.read_bytes())
    save_figure(label_efficiency_figure(pd.read_csv(summary), "nodule", "auc"), out)
    assert (out.read_bytes(), pdf.read_bytes()) == first
    assert b"CreationDate" not in first[1]
