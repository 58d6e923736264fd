"""Fine-tuning within a memory budget: streamed and held splits give the same run; a dataset
larger than the budget is never read whole; the seeds of a job share the fixed splits."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from medssl.datasets.hdf5 import SliceReader, read_meta
from medssl.datasets.maskfile import MASKS, MaskError, load_masks, open_mask_file
from medssl.datasets.splits import make_partition, make_subsets, read_label_table, read_subsets
from medssl.finetuning import loop as ft
from medssl.finetuning import streaming
from tests.finetuning.cohorts import TASK_SETTINGS, task_type_cohort


@pytest.fixture(scope="module")
def prepared(converted_cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return task_type_cohort(converted_cohort, tmp_path_factory.mktemp("streaming"))


def run_args(prepared: dict, name: str, settings: dict, seed: int = 0) -> dict:
    task = prepared[name]["task"]
    return {
        "data": prepared["h5"],
        "partition": prepared[name]["partition"],
        "subsets": read_subsets(prepared["root"] / f"{name}.seed0.csv"),
        "fraction": 1.0,
        "seed": seed,
        "task": task,
        "settings": settings,
        "init": "scratch",
        "masks": prepared["masks"] if task["type"] == "segmentation" else None,
    }


def split_sizes(partition: pd.DataFrame) -> tuple[int, int]:
    """Rows of the fixed val and test splits."""
    counts = partition["split"].value_counts()
    return int(counts["val"]), int(counts["test"])


def comparable(metrics: dict) -> dict:
    """metrics.json without what names the settings (the budget differs by design)."""
    return {k: v for k, v in metrics.items() if k not in ("provenance", "settings")}


def assert_same_arrays(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize(
    ("name", "hold", "extra"),
    [
        ("nodule", "streamed", {}),
        ("nodule", "fixed", {"tta": "flip"}),
        ("region", "streamed", {"tta": "ten_crop"}),
        ("findings", "streamed", {"num_workers": 1}),
        ("lung", "streamed", {"tta": "flip", "seg_loss": "dice_bce"}),
    ],
)
def test_a_streamed_run_equals_the_held_run(prepared, name, hold, extra, one_thread) -> None:
    """Same seed, same batches, same augmentation: the same metrics, predictions and weights."""
    settings = {**TASK_SETTINGS, **extra}
    args = run_args(prepared, name, settings, seed=2)
    held = ft.finetune(**args)
    with ft.job_data(args["data"], args["masks"], args["task"], settings, mode=hold) as job:
        streamed = ft.finetune(**args, job=job)
        n_val, n_test = split_sizes(args["partition"])
        assert job.reads["held_rows"] == (n_val + n_test if hold == "fixed" else 0)
        assert job.peak_bytes <= job.budget
    a, b = comparable(held.metrics), comparable(streamed.metrics)
    if args["task"]["type"] == "segmentation":
        # Streamed segmentation sums its loss batch by batch: equal up to rounding.
        for one, other in zip(a.pop("history"), b.pop("history"), strict=True):
            assert one.pop("val_loss") == pytest.approx(other.pop("val_loss"), rel=1e-5)
            assert one == other
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert_same_arrays(held.predictions, streamed.predictions)
    for key, value in held.model.state_dict().items():
        assert torch.equal(value, streamed.model.state_dict()[key]), key


def write_large_cohort(root: Path, n_patients: int, slices: int, size: int = 32) -> dict:
    """A binary cohort of uint8 slices, one chunk per slice, larger than the test's budget."""
    rng = np.random.default_rng(1)
    n = n_patients * slices
    images = rng.integers(0, 120, (n, 1, size, size), dtype=np.uint8)
    labels = (rng.random(n) < 0.3).astype(int)
    images[labels == 1, :, 8:16, 8:16] = 250
    patients = [f"P{i // slices:03d}" for i in range(n)]
    sops = [f"1.9.{i}" for i in range(n)]
    h5 = root / "large.h5"
    with h5py.File(h5, "w") as handle:
        stored = handle.create_dataset("images", data=images, chunks=(1, 1, size, size))
        stored.attrs.update({"policy": "window", "scale": 1 / 255, "offset": 0.0, "channels": "[]"})
        meta = handle.create_group("meta")
        for key, values in (("patient_id", patients), ("sop_uid", sops)):
            meta.create_dataset(key, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
    pd.DataFrame({"patient_id": patients, "sop_uid": sops, "finding": labels}).to_csv(
        root / "labels.csv", index=False
    )
    task = {"name": "finding", "column": "finding", "type": "binary"}
    table = read_label_table(root / "labels.csv", "sop_uid", "finding")
    partition = make_partition(read_meta(h5), table, task, str(h5), "labels.csv")
    return {"h5": h5, "partition": partition, "subsets": make_subsets(partition, 0), "task": task}


def test_a_dataset_several_times_the_budget_is_never_read_whole(tmp_path, monkeypatch) -> None:
    """6 MB stored (24 MB as float32) under a 2 MB budget: batches only, and only the run's rows."""
    cohort = write_large_cohort(tmp_path, n_patients=150, slices=40)
    settings = {"epochs": 1, "batch_size": 32, "augment": False, "memory_budget_gb": 2 / 1024}
    read: list[np.ndarray] = []
    real_getitem = streaming.RowsDataset.__getitem__

    def recording(self, rows):
        read.append(np.asarray(rows).copy())
        return real_getitem(self, rows)

    monkeypatch.setattr(streaming.RowsDataset, "__getitem__", recording)
    args = (cohort["h5"], None, cohort["task"], settings)
    tracemalloc.start()
    with ft.job_data(*args) as job:
        result = ft.finetune(
            cohort["h5"],
            cohort["partition"],
            cohort["subsets"],
            0.1,
            0,
            cohort["task"],
            settings,
            "scratch",
            job=job,
        )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    stored_bytes = 150 * 40 * 32 * 32
    assert stored_bytes > 2.5 * job.budget
    assert job.reads["held_rows"] == 0 and job.peak_bytes <= job.budget
    assert peak < stored_bytes / 2  # neither the stored array nor its float32 copy existed
    assert max(len(rows) for rows in read) == ft.EVAL_BATCH
    partition = cohort["partition"]
    fixed = partition.loc[partition["split"] != "train", "index"]
    wanted = set(fixed) | set(ft.select_training(partition, cohort["subsets"], 0.1))
    assert set(np.concatenate(read).tolist()) == wanted  # the rest of train is never read
    assert result.metrics["n_train"] < (partition["split"] == "train").sum()
    assert 0 <= result.metrics["test"]["auc"] <= 1


def test_the_seeds_of_a_job_read_the_fixed_splits_once(prepared, one_thread) -> None:
    settings = {**TASK_SETTINGS, "epochs": 1}
    first = run_args(prepared, "nodule", settings, seed=0)
    n_val, n_test = split_sizes(first["partition"])
    with ft.job_data(first["data"], None, first["task"], settings) as job:
        results = [
            ft.finetune(**run_args(prepared, "nodule", settings, s), job=job) for s in (0, 1)
        ]
        n_train = sum(r.metrics["n_train"] for r in results)
        assert job.reads["held_rows"] == n_val + n_test + n_train
    alone = ft.finetune(**run_args(prepared, "nodule", settings, seed=1))
    assert comparable(alone.metrics) == comparable(results[1].metrics)


def test_a_budget_below_one_batch_is_refused_by_name(prepared) -> None:
    args = run_args(prepared, "nodule", {**TASK_SETTINGS, "memory_budget_gb": 1e-6})
    with pytest.raises(ValueError, match="memory_budget_gb .* lower batch_size"):
        ft.finetune(**args)
    with pytest.raises(ValueError, match="memory_budget_gb must be > 0"):
        ft.resolve_settings({"memory_budget_gb": 0})
    with pytest.raises(ValueError, match="num_workers >= 0"):
        ft.resolve_settings({"num_workers": -1})


def test_the_mask_row_reader_reads_what_load_masks_reads(prepared) -> None:
    annotated_rows = np.flatnonzero(h5py.File(prepared["masks"], "r")["annotated"][...])
    rows = annotated_rows[[3, 0, 5, 1]]
    with open_mask_file(prepared["masks"], rows) as handle:
        read = SliceReader(handle, MASKS).read_rows(rows)
    np.testing.assert_array_equal(read, load_masks(prepared["masks"], rows))
    with h5py.File(prepared["masks"], "r") as handle:
        missing = np.flatnonzero(~handle["annotated"][...])
    if len(missing):
        with pytest.raises(MaskError, match="have no annotation"):
            open_mask_file(prepared["masks"], missing[:1])
    with pytest.raises(MaskError, match="not a medssl mask file"):
        open_mask_file(prepared["h5"])
