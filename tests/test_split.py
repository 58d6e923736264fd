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


def test_official_split_cli_records_how_it_was_made(tmp_path: Path) -> None:
    from tests.datasets.test_splits import write_meta_h5

    patients = [f"{i:03d}" for i in range(12)]
    h5 = tmp_path / "d.h5"
    write_meta_h5(h5, patients, 2)
    rows = [
        {
            "sop_uid": f"1.2.{p}.{s}",
            "patient_id": p,
            "official_split": "test" if i >= 9 or (i == 4 and s == 1) else "train",
            "tb": int(i % 3 == 0),
        }
        for i, p in enumerate(patients)
        for s in range(2)
    ]
    labels = tmp_path / "d.labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    task = {"name": "tb", "column": "tb", "type": "binary", "split": {"source": "official"}}
    out = tmp_path / "tb.csv"
    argv = ["--data", str(h5), "--labels", str(labels), "--task", json.dumps(task)]
    assert split.main([*argv, "--out", str(out)]) == 0
    part = read_partition(out)
    test = set(part.loc[part["split"] == "test", "patient_id"])
    assert test == {"004", "009", "010", "011"}
    sidecar = json.loads((tmp_path / "tb.csv.provenance.json").read_text())
    assert sidecar["stage"] == "split"
    assert sidecar["split"]["conflicting_patients"] == 1
    assert sidecar["split"]["conflict_examples"] == {"004": ["test", "train"]}
    assert sidecar["split"]["val"].startswith("carved")


def test_official_split_of_a_segmentation_task_comes_from_the_label_table(tmp_path: Path) -> None:
    from tests.datasets.test_splits import write_meta_h5

    patients = [f"{i:03d}" for i in range(8)]
    h5 = tmp_path / "d.h5"
    write_meta_h5(h5, patients, 1)
    masks = np.zeros((8, 4, 4), np.uint8)
    masks[::2, 1:3, 1:3] = 1
    write_masks(tmp_path / "vessel.h5", masks, np.ones(8, bool), {"structure": "vessel"})
    table = pd.DataFrame(
        {
            "sop_uid": [f"1.2.{p}.0" for p in patients],
            "official_split": ["train"] * 6 + ["test"] * 2,
        }
    )
    table.to_csv(tmp_path / "d.labels.csv", index=False)
    task = {"name": "v", "type": "segmentation", "split": {"source": "official", "val": 0.2}}
    out = tmp_path / "v.csv"
    argv = ["--data", str(h5), "--labels", str(tmp_path / "vessel.h5"), "--out", str(out)]
    argv += ["--task", json.dumps(task)]
    assert split.main(argv) == 1  # the mask file has no split of its own
    assert split.main([*argv, "--official-splits", str(tmp_path / "d.labels.csv")]) == 0
    part = read_partition(out)
    assert set(part.loc[part["split"] == "test", "patient_id"]) == {"006", "007"}
    assert set(part["split"]) == {"train", "val", "test"}


def test_a_converted_release_is_split_by_its_official_lists(tmp_path: Path) -> None:
    """ChestX-ray14 replica -> convert -> split: the released test list stays the test set."""
    from medssl import convert
    from tests.datasets.replicas import chestxray14

    chestxray14(tmp_path / "cxr", conflict=True)  # patient 7 also has an image on test_list
    h5, labels = tmp_path / "cxr.h5", tmp_path / "cxr.labels.csv"
    argv = ["--preset", "chestxray14", "--root", str(tmp_path / "cxr"), "--out", str(h5)]
    argv += ["--rejects", str(tmp_path / "rej.csv"), "--labels-out", str(labels)]
    assert convert.main([*argv, "--settings", '{"image_size": 32}']) == 0
    task = {"name": "effusion", "column": "Effusion", "type": "binary"}
    task["split"] = {"source": "official", "val": 0.2}
    out = tmp_path / "effusion.csv"
    argv = ["--data", str(h5), "--labels", str(labels), "--task", json.dumps(task)]
    assert split.main([*argv, "--out", str(out)]) == 0
    part = read_partition(out)
    test = set(part.loc[part["split"] == "test", "patient_id"])
    assert test == {"00000007", "00000008", "00000009", "00000010"}
    assert part.groupby("patient_id")["split"].nunique().max() == 1
    assert set(part["split"]) == {"train", "val", "test"}
    sidecar = json.loads((tmp_path / "effusion.csv.provenance.json").read_text())
    assert sidecar["split"]["conflict_examples"] == {"00000007": ["test", "train"]}
