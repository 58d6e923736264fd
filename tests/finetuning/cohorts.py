"""Small labelled cohorts shared by the fine-tuning tests (library and stage)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from medssl.core.files import write_csv
from medssl.datasets import mask_sources as mk
from medssl.datasets.hdf5 import read_meta
from medssl.datasets.splits import label_columns, make_partition, make_subsets, read_label_table
from medssl.models.backbones import build_backbone, save_encoder

SQUARE_SETTINGS = {"epochs": 2, "batch_size": 16, "lr": 1e-3, "augment": True}
"""Short runs on the bright-square cohort."""

TASK_SETTINGS = {"epochs": 2, "batch_size": 32, "lr": 1e-3, "decoder_channels": [32, 16, 16, 8, 8]}
"""Short runs on the synthetic cohort's tasks (a narrow U-Net decoder for segmentation)."""

TASKS = {
    "nodule": {"type": "binary", "column": "nodule"},
    "region": {"type": "multiclass", "column": "region"},
    "findings": {"type": "multilabel", "columns": ["thorax", "nodule", "pelvis"]},
    "lung": {"type": "segmentation", "masks": {"format": "folder", "structure": "lung"}},
}
"""One task of every task type on the synthetic cohort."""


def bright_square_cohort(root: Path) -> dict:
    """10 patients x 12 slices of 1x32x32; label = a bright square is present."""
    rng = np.random.default_rng(0)
    n_patients, slices, size = 10, 12, 32
    n = n_patients * slices
    images = rng.normal(60, 10, (n, 1, size, size))
    labels = np.zeros(n, dtype=int)
    for i in range(n):
        patient = i // slices
        if patient % 2 and rng.random() < 0.5:
            y, x = rng.integers(2, size - 10, 2)
            images[i, :, y : y + 8, x : x + 8] += 120
            labels[i] = 1
        if patient % 2 and i % slices == 0:  # every odd patient has a positive slice
            images[i, :, 4:12, 4:12] += 120
            labels[i] = 1
    patients = [f"P{i // slices:02d}" for i in range(n)]
    sops = [f"1.9.{i}" for i in range(n)]
    h5 = root / "d.h5"
    string = h5py.string_dtype()
    with h5py.File(h5, "w") as handle:
        stored = handle.create_dataset(
            "images", data=np.clip(images, 0, 255).astype(np.uint8), chunks=(1, 1, size, size)
        )
        stored.attrs.update({"policy": "window", "scale": 1 / 255, "offset": 0.0, "channels": "[]"})
        meta = handle.create_group("meta")
        meta.create_dataset("patient_id", data=np.array(patients, dtype=object), dtype=string)
        meta.create_dataset("sop_uid", data=np.array(sops, dtype=object), dtype=string)
    label_csv = root / "labels.csv"
    pd.DataFrame({"patient_id": patients, "sop_uid": sops, "nodule": labels}).to_csv(
        label_csv, index=False
    )
    task = {"name": "nodule", "dataset": "d", "column": "nodule", "type": "binary"}
    table = read_label_table(label_csv, "sop_uid", "nodule")
    partition = make_partition(read_meta(h5), table, task, str(h5), str(label_csv))
    subsets = make_subsets(partition, seed=0)
    write_csv(root / "partition.csv", partition)
    write_csv(root / "seed0.csv", subsets)
    encoder = root / "encoder.pt"
    torch.manual_seed(123)
    save_encoder(build_backbone("resnet_small", 1), encoder, "resnet_small", {"method": "test"})
    return {
        "root": root,
        "h5": h5,
        "partition": partition,
        "subsets": subsets,
        "task": task,
        "encoder": encoder,
    }


def finetune_cli_args(
    h5: Path, partition: Path, subsets: Path, task: dict, settings: dict, out: Path, seed: int = 0
) -> list[str]:
    """``python -m medssl.finetune`` arguments of one seed at fraction 1, CPU, one thread
    (add ``--init``)."""
    return [
        "--data", str(h5), "--partition", str(partition), "--subsets", str(subsets),
        "--fraction", "1.0", "--seed", str(seed), "--task", json.dumps(task),
        "--settings", json.dumps(settings), "--threads", "1", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip


def square_cli_args(cohort: dict, out: Path, settings: dict = SQUARE_SETTINGS) -> list[str]:
    """``medssl.finetune`` arguments of one seed on the bright-square cohort (add ``--init``)."""
    root = cohort["root"]
    partition, subsets = root / "partition.csv", root / "seed0.csv"
    return finetune_cli_args(cohort["h5"], partition, subsets, cohort["task"], settings, out)


def task_type_cohort(converted_cohort: dict, root: Path) -> dict:
    """Partition, subsets and (for segmentation) the mask file of each task in :data:`TASKS`."""
    h5 = converted_cohort["h5"]
    labels = pd.read_csv(converted_cohort["labels"], dtype=str)
    labels["thorax"] = labels["region"].str.endswith("thorax").astype(int)
    labels["pelvis"] = (labels["region"] == "lower_abdomen").astype(int)
    labels["nodule"] = labels["nodule"].astype(int)
    write_csv(root / "labels.csv", labels)
    masks = root / "lung.h5"
    found, annotated = mk.build_masks(h5, "folder", converted_cohort["masks_dir"], "lung")
    mk.write_masks(masks, found, annotated, {"structure": "lung"})
    out = {"root": root, "h5": h5, "masks": masks}
    for name, task in TASKS.items():
        task = {"name": name, "dataset": "synth", "labels_key": "sop_uid", **task}
        if task["type"] == "segmentation":
            table = mk.mask_labels(masks, h5)
        else:
            table = read_label_table(root / "labels.csv", "sop_uid", label_columns(task))
        partition = make_partition(read_meta(h5), table, task, str(h5), "labels.csv")
        write_csv(root / f"{name}.csv", partition)
        write_csv(root / f"{name}.seed0.csv", make_subsets(partition, seed=0))
        out[name] = {"task": task, "partition": partition}
    return out


def rows_of_test_split(prepared: dict, name: str) -> np.ndarray:
    """Partition rows of the test split of task ``name``, in file order."""
    partition = prepared[name]["partition"]
    return partition.loc[partition["split"] == "test", "index"].sort_values().to_numpy()
