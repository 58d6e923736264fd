"""Fine-tuning runs: metrics.json contract, init handling, frozen backbones, determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from medssl.finetuning import loop as ft
from medssl.datasets.hdf5 import read_meta
from medssl.core.files import write_csv
from medssl.models.backbones import build_backbone, save_encoder
from medssl.datasets.splits import make_partition, make_subsets, read_label_table

SETTINGS = {"epochs": 2, "batch_size": 16, "lr": 1e-3, "augment": True}
TOP_KEYS = {
    "init",
    "task",
    "task_type",
    "fraction",
    "seed",
    "n_train",
    "n_val",
    "n_test",
    "n_train_patients",
    "best_epoch",
    "epochs_run",
    "stopped_early",
    "select_metric",
    "val",
    "test",
    "history",
    "settings",
    "provenance",
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """10 patients x 12 slices of 1x32x32; label = a bright square is present."""
    root = tmp_path_factory.mktemp("cohort")
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


def cli_args(cohort: dict, out: Path, settings: dict = SETTINGS, *extra: str) -> list[str]:
    return [
        "--data",
        str(cohort["h5"]),
        "--partition",
        str(cohort["root"] / "partition.csv"),
        "--subsets",
        str(cohort["root"] / "seed0.csv"),
        "--fraction",
        "1.0",
        "--seed",
        "0",
        "--task",
        json.dumps(cohort["task"]),
        "--settings",
        json.dumps(settings),
        "--threads",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def run(cohort: dict, **kwargs) -> ft.FinetuneResult:
    params = {
        "data": cohort["h5"],
        "partition": cohort["partition"],
        "subsets": cohort["subsets"],
        "fraction": 1.0,
        "seed": 0,
        "task": cohort["task"],
        "settings": SETTINGS,
        "init": "scratch",
    }
    params.update(kwargs)
    return ft.finetune(**params)


def test_cli_writes_documented_metrics(cohort: dict, tmp_path: Path) -> None:
    out = tmp_path / "scratch" / "metrics.json"
    assert ft.main(cli_args(cohort, out, SETTINGS, "--init", "scratch")) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == TOP_KEYS
    assert metrics["init"] == "scratch" and metrics["task"] == "nodule"
    assert metrics["task_type"] == "binary" and metrics["fraction"] == 1.0
    part = cohort["partition"]
    assert metrics["n_train"] == int((part["split"] == "train").sum())
    assert metrics["n_val"] == int((part["split"] == "val").sum())
    assert metrics["n_test"] == int((part["split"] == "test").sum())
    assert metrics["n_train_patients"] == part.loc[part["split"] == "train", "patient_id"].nunique()
    assert metrics["best_epoch"] in (1, 2)
    for split in ("val", "test"):
        assert set(metrics[split]) == {"auc", "accuracy", "f1"}
        assert all(0 <= v <= 1 for v in metrics[split].values())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert {"train_loss", "val_auc", "val_accuracy", "val_f1", "val_loss"} <= set(
        metrics["history"][0]
    )
    assert metrics["settings"]["protocol"] == "full" and metrics["settings"]["epochs"] == 2
    assert metrics["provenance"]["stage"] == "finetune" and metrics["provenance"]["seed"] == 0


def test_scratch_and_encoder_inits(cohort: dict, tmp_path: Path) -> None:
    out = tmp_path / "simclr" / "metrics.json"
    args = cli_args(cohort, out, SETTINGS, "--init", "simclr", "--encoder", str(cohort["encoder"]))
    assert ft.main(args) == 0
    run_info = json.loads(out.read_text())["provenance"]["settings"]
    assert run_info["encoder"] == str(cohort["encoder"])
    assert run_info["encoder_sidecar"]["method"] == "test"
    assert run_info["backbone"] == "resnet_small"
    # Before any training, an encoder init carries the encoder's weights, scratch does not.
    saved = torch.load(cohort["encoder"], weights_only=True)
    from_encoder, _, _ = ft.build_model("binary", 2, 1, cohort["encoder"], None)
    torch.manual_seed(0)
    scratch, name, info = ft.build_model("binary", 2, 1, None, None)
    assert name == "resnet_small" and info is None
    key = "layer1.0.conv1.weight"
    assert torch.equal(from_encoder.backbone.state_dict()[key], saved[key])
    assert not torch.equal(scratch.backbone.state_dict()[key], saved[key])


def test_linear_protocol_freezes_backbone(cohort: dict) -> None:
    settings = {**SETTINGS, "protocol": "linear", "lr": 1e-2}
    result = run(cohort, settings=settings, encoder=cohort["encoder"], init="simclr")
    saved = torch.load(cohort["encoder"], weights_only=True)
    after = result.model.backbone.state_dict()
    # Includes BatchNorm running statistics and num_batches_tracked.
    assert set(after) == set(saved)
    for key, value in saved.items():
        assert torch.equal(after[key], value), key
    torch.manual_seed(0)
    fresh = ft.build_model("binary", 2, 1, cohort["encoder"], None)[0]
    assert not torch.equal(result.model.head.weight, fresh.head.weight)


def test_same_seed_same_numbers(cohort: dict, tmp_path: Path) -> None:
    first, second = run(cohort), run(cohort)
    assert first.metrics["test"] == second.metrics["test"]
    assert first.metrics["history"] == second.metrics["history"]
    third = run(cohort, seed=1)
    assert third.metrics["history"] != first.metrics["history"]


def test_learns_the_bright_square(cohort: dict) -> None:
    settings = {**SETTINGS, "epochs": 8, "batch_size": 8, "augment": False}
    result = run(cohort, settings=settings)
    assert result.metrics["val"]["auc"] > 0.9 and result.metrics["test"]["auc"] > 0.9
    assert result.metrics["history"][-1]["train_loss"] < result.metrics["history"][0]["train_loss"]


def test_divergence_is_an_error_and_writes_nothing(cohort: dict, tmp_path: Path, caplog) -> None:
    out = tmp_path / "nan" / "metrics.json"
    settings = {**SETTINGS, "lr": 1e30}  # the default optimizer, adam
    assert ft.main(cli_args(cohort, out, settings, "--init", "scratch")) == 1
    assert not out.exists() and not out.parent.exists()
    assert "diverged" in caplog.text
    with pytest.raises(ft.FinetuneError, match="diverged"):
        run(cohort, settings={**settings, "optimizer": "sgd"})


def test_bad_settings_are_refused(cohort: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown key"):
        ft.resolve_settings({"protocl": "linear"})
    with pytest.raises(ValueError, match="optimizer"):
        ft.resolve_settings({"optimizer": "lbfgs"})
    out = tmp_path / "bad" / "metrics.json"
    assert ft.main(cli_args(cohort, out, {"epochs": 0}, "--init", "scratch")) == 1
    assert not out.exists()


def test_multiclass_run(cohort: dict) -> None:
    part = cohort["partition"].copy()
    # Three classes: negative, square, and "square in an odd patient's first slice".
    part.loc[(part["label"] == 1) & (part["index"] % 12 == 0), "label"] = 2
    task = {"name": "three", "type": "multiclass"}
    result = run(cohort, partition=part, task=task, settings={**SETTINGS, "epochs": 1})
    assert result.model.head.out_features == 3
    test = result.metrics["test"]
    assert 0 <= test["accuracy"] <= 1 and 0 <= test["f1"] <= 1
    assert math.isnan(test["auc"]) or 0 <= test["auc"] <= 1


def test_augment_batch_is_seeded_and_keeps_shape() -> None:
    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    first = ft.augment_batch(images, torch.Generator().manual_seed(0))
    second = ft.augment_batch(images, torch.Generator().manual_seed(0))
    assert first.shape == images.shape and torch.equal(first, second)


def test_balanced_class_weights_equalise_class_totals() -> None:
    from medssl.finetuning.loop import balanced_class_weights

    binary = torch.tensor([0, 0, 0, 1])
    assert balanced_class_weights(binary, "binary", 1).tolist() == [3.0]
    labels = torch.tensor([0, 0, 0, 0, 2, 2])
    weights = balanced_class_weights(labels, "multiclass", 3)
    totals = torch.bincount(labels, minlength=3).float() * weights
    assert weights[1] == 0  # absent from the subset
    assert torch.allclose(totals[[0, 2]], torch.full((2,), 3.0))
