"""``python -m medssl.split``: the partition file, from a label table or a mask file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medssl import split, subsample
from medssl.datasets.mask_sources import build_masks, write_masks
from medssl.datasets.splits import PARTITION_COLUMNS, make_subsets, read_partition, read_subsets
from tests.datasets.test_splits import cohort


def test_cli_round_trip_and_patient_level(tmp_path: Path) -> None:
    h5, labels = cohort(tmp_path)
    out = tmp_path / "splits" / "nodule.csv"
    task = '{"name": "nodule", "dataset": "d", "column": "nodule", "type": "binary"}'
    argv = ["--data", str(h5), "--labels", str(labels), "--task", task, "--out", str(out)]
    assert split.main(argv) == 0
    part = read_partition(out)
    assert list(part.columns) == list(PARTITION_COLUMNS)
    assert part["patient_id"].str.len().eq(3).all()  # "007" is not turned into 7
    assert part.groupby("patient_id")["split"].nunique().max() == 1
    assert set(part["split"]) == {"train", "val", "test"}
    assert part["index"].is_monotonic_increasing and len(part) == 120
    seeds_out = tmp_path / "splits" / "nodule" / "seed3.csv"
    argv = ["--partition", str(out), "--seed", "3", "--out", str(seeds_out)]
    assert subsample.main(argv) == 0
    pd.testing.assert_frame_equal(read_subsets(seeds_out), make_subsets(part, 3))


def test_errors_are_one_line_and_write_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h5, labels = cohort(tmp_path)
    out = tmp_path / "p.csv"
    argv = ["--data", str(h5), "--labels", str(labels), "--out", str(out), "--task"]
    with caplog.at_level(logging.ERROR):
        task = {"name": "x", "dataset": "d", "column": "nope", "type": "binary"}
        assert split.main([*argv, json.dumps(task)]) == 1
        assert split.main([*argv, json.dumps({**task, "type": "regression"})]) == 1
        assert split.main([*argv, "[1, 2]"]) == 1
    assert "error: split: " in caplog.messages[0] and "'nope'" in caplog.messages[0]
    assert caplog.messages[1].startswith("error: split: unknown task type 'regression'")
    assert "JSON object with 'type'" in caplog.messages[2]
    assert not out.exists()


def test_segmentation_labels_come_from_the_mask_file(
    converted_cohort: dict, tmp_path: Path
) -> None:
    h5 = converted_cohort["h5"]
    masks, annotated = build_masks(h5, "folder", converted_cohort["masks_dir"], "lung")
    write_masks(tmp_path / "lung.h5", masks, annotated, {"structure": "lung"})
    task = {"name": "lung", "type": "segmentation", "labels_key": "series_uid"}
    out = tmp_path / "lung.csv"
    argv = ["--data", str(h5), "--labels", str(tmp_path / "lung.h5"), "--out", str(out)]
    assert split.main([*argv, "--task", json.dumps(task)]) == 0
    part = read_partition(out)
    np.testing.assert_array_equal(part["index"], np.flatnonzero(annotated))
    foreground = masks[annotated].any(axis=(1, 2)).astype(int)
    np.testing.assert_array_equal(part["label"], foreground)
    assert set(part["label_name"]) == {"background", "foreground"}
