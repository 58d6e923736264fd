"""Every task type trains on the synthetic cohort and writes its metrics; metric references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from medssl.finetuning import loop as ft
from medssl.datasets import mask_sources as mk
from medssl.pipeline.config import SCHEMA_PATH, TASK_METRICS, check_references, load_config
from medssl.datasets.hdf5 import load_images, read_meta
from medssl.core.files import write_csv
from medssl.finetuning.metrics import multilabel_metrics, segmentation_metrics
from medssl.finetuning.protocols import PROTOCOLS
from medssl.datasets.splits import TASK_TYPES as SPLIT_TYPES
from medssl.datasets.splits import label_columns, make_partition, make_subsets, read_label_table
from medssl.finetuning.tasktypes import TASK_TYPES
from medssl.finetuning.tta import TTA_MODES, predict_with_tta, ten_crop_views

SETTINGS = {"epochs": 2, "batch_size": 32, "lr": 1e-3, "decoder_channels": [32, 16, 16, 8, 8]}

TASKS = {
    "nodule": {"type": "binary", "column": "nodule"},
    "region": {"type": "multiclass", "column": "region"},
    "findings": {"type": "multilabel", "columns": ["thorax", "nodule", "pelvis"]},
    "lung": {"type": "segmentation", "masks": {"format": "folder", "structure": "lung"}},
}


@pytest.fixture(scope="module")
def prepared(converted_cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Partition, subsets and (for segmentation) the mask file of every task type."""
    root = tmp_path_factory.mktemp("tasktypes")
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


def test_registries_match_the_schema() -> None:
    """The schema's enums (parsed without torch) name exactly what the registries hold."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    task_props = schema["properties"]["tasks"]["additionalProperties"]["properties"]
    finetune_props = schema["properties"]["finetune"]["properties"]
    assert set(task_props["type"]["enum"]) == set(TASK_TYPES) == set(SPLIT_TYPES)
    assert set(finetune_props["protocol"]["enum"]) == set(PROTOCOLS)
    assert set(finetune_props["tta"]["enum"]) == set(TTA_MODES)
    assert {name: kind.metrics for name, kind in TASK_TYPES.items()} == TASK_METRICS
    every_metric = {m for metrics in TASK_METRICS.values() for m in metrics}
    assert set(task_props["metric"]["enum"]) == every_metric
    assert set(finetune_props["select_metric"]["enum"]) == every_metric | {"auto", "loss"}


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_type_trains_and_writes_metrics(prepared, name, tmp_path, one_thread) -> None:
    root, task = prepared["root"], prepared[name]["task"]
    out = tmp_path / "metrics.json"
    argv = ["--data", str(prepared["h5"]), "--partition", str(root / f"{name}.csv")]
    argv += ["--subsets", str(root / f"{name}.seed0.csv"), "--fraction", "1.0", "--seed", "0"]
    argv += ["--task", json.dumps(task), "--settings", json.dumps(SETTINGS), "--init", "scratch"]
    argv += ["--device", "cpu", "--out", str(out)]
    if task["type"] == "segmentation":
        assert ft.main(argv) == 1  # no masks: an error, no file
        assert not out.exists()
        argv += ["--masks", str(prepared["masks"])]
    assert ft.main(argv) == 0
    metrics = json.loads(out.read_text())
    kind = TASK_TYPES[task["type"]]
    assert metrics["task_type"] == task["type"]
    assert set(metrics["test"]) == set(kind.metrics)
    assert metrics["select_metric"] == ("dice" if task["type"] == "segmentation" else "auc")
    assert len(metrics["history"]) == 2
    for value in metrics["test"].values():
        assert value is None or 0 <= value <= 1
    if task["type"] == "multilabel":
        assert set(metrics["test_auc_per_label"]) == set(task["columns"])


def _test_rows(prepared: dict, name: str) -> np.ndarray:
    partition = prepared[name]["partition"]
    return partition.loc[partition["split"] == "test", "index"].sort_values().to_numpy()


def test_segmentation_dice_matches_a_numpy_reference(prepared, one_thread) -> None:
    """The run's test Dice is the mean per-slice Dice of its model's thresholded output."""
    settings = {**SETTINGS, "epochs": 1}
    data = prepared["lung"]
    result = ft.finetune(
        prepared["h5"],
        data["partition"],
        make_subsets(data["partition"], 0),
        1.0,
        0,
        data["task"],
        settings,
        "scratch",
        masks=prepared["masks"],
    )
    rows = _test_rows(prepared, "lung")
    result.model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(result.model(load_images(prepared["h5"], rows))[:, 0]).numpy()
    truth = mk.load_masks(prepared["masks"], rows).astype(bool)
    pred = probs >= 0.5
    inter = (pred & truth).sum(axis=(1, 2))
    total = pred.sum(axis=(1, 2)) + truth.sum(axis=(1, 2))
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)  # empty vs empty = 1
    assert result.metrics["test"]["dice"] == pytest.approx(dice.mean(), abs=1e-6)
    union = (pred | truth).sum(axis=(1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    assert result.metrics["test"]["iou"] == pytest.approx(iou.mean(), abs=1e-6)


def test_segmentation_metrics_reference_values() -> None:
    truth = np.zeros((3, 4, 4), dtype=bool)
    truth[0, :2] = True  # 8 pixels
    truth[1, 0, 0] = True
    probs = np.zeros((3, 4, 4))
    probs[0, :1] = 0.9  # 4 of 8 found: Dice 2*4/12, IoU 4/8
    probs[1, 3, 3] = 0.7  # a miss: 0
    # slice 2: nothing in either: 1
    values = segmentation_metrics(truth, probs)
    assert values["dice"] == pytest.approx((2 * 4 / 12 + 0 + 1) / 3)
    assert values["iou"] == pytest.approx((0.5 + 0 + 1) / 3)


def test_multilabel_auc_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, (40, 4))
    labels[:, 3] = 1  # undefined AUC: left out of the mean
    scores = np.clip(labels * 0.3 + rng.random((40, 4)), 0, 1)
    values = multilabel_metrics(labels, scores)
    expected = [roc_auc_score(labels[:, j], scores[:, j]) for j in range(3)]
    assert values["auc"] == pytest.approx(np.mean(expected))
    assert values["auc_per_label"][:3] == pytest.approx(expected)
    assert math.isnan(values["auc_per_label"][3])
    assert values["accuracy"] == pytest.approx(np.mean((scores >= 0.5) == labels))


def test_multilabel_partition_keeps_every_label(prepared) -> None:
    partition = prepared["findings"]["partition"]
    labels = pd.read_csv(prepared["root"] / "labels.csv", dtype={"sop_uid": str})
    meta = read_meta(prepared["h5"])
    joined = labels.set_index("sop_uid").loc[meta.loc[partition["index"], "sop_uid"]]
    codes = joined["thorax"].to_numpy() + 2 * joined["nodule"].to_numpy()
    codes = codes + 4 * joined["pelvis"].to_numpy()
    np.testing.assert_array_equal(partition["label"].to_numpy(), codes)
    targets = TASK_TYPES["multilabel"].targets(torch.as_tensor(codes), 3)
    np.testing.assert_array_equal(
        targets.numpy(), joined[["thorax", "nodule", "pelvis"]].to_numpy()
    )


def test_tta_flip_and_ten_crop_average_their_views() -> None:
    images = torch.arange(2 * 32 * 32, dtype=torch.float32).reshape(2, 1, 32, 32)

    def left_half(x: torch.Tensor) -> torch.Tensor:
        return x[..., :16].mean(dim=(1, 2, 3))

    flipped = predict_with_tta(left_half, images, "flip", dense=False)
    both = (images[..., :16].mean(dim=(1, 2, 3)) + images[..., 16:].mean(dim=(1, 2, 3))) / 2
    torch.testing.assert_close(flipped, both)
    # Dense outputs are mirrored back: a map that copies the image is unchanged.
    torch.testing.assert_close(
        predict_with_tta(lambda x: x[:, 0], images, "flip", dense=True), images[:, 0]
    )
    views = ten_crop_views(images)
    assert len(views) == 10 and all(v.shape == images.shape for v in views)
    # The last five are the crops of the mirrored image: its top-left is the top-right mirrored.
    torch.testing.assert_close(views[5], views[1].flip(-1))
    corner = torch.nn.functional.interpolate(
        images, size=(37, 37), mode="bilinear", align_corners=False, antialias=True
    )[..., :32, :32]
    torch.testing.assert_close(views[0], corner)
    averaged = predict_with_tta(left_half, images, "ten_crop", dense=False)
    torch.testing.assert_close(averaged, torch.stack([left_half(v) for v in views]).mean(0))
    with pytest.raises(ValueError, match="classification"):
        predict_with_tta(left_half, images, "ten_crop", dense=True)


def test_metrics_json_of_a_ten_crop_run(prepared, tmp_path: Path, one_thread) -> None:
    data = prepared["region"]
    settings = {**SETTINGS, "epochs": 1}
    plain = ft.finetune(
        prepared["h5"],
        data["partition"],
        make_subsets(data["partition"], 0),
        1.0,
        0,
        data["task"],
        settings,
        "scratch",
    )
    ten = ft.finetune(
        prepared["h5"],
        data["partition"],
        make_subsets(data["partition"], 0),
        1.0,
        0,
        data["task"],
        {**settings, "tta": "ten_crop"},
        "scratch",
    )
    assert plain.metrics["val"] == ten.metrics["val"]  # validation never uses TTA
    rows = _test_rows(prepared, "region")
    images = load_images(prepared["h5"], rows)
    ten.model.eval()
    with torch.no_grad():
        probs = torch.stack([torch.softmax(ten.model(v), 1) for v in ten_crop_views(images)])
    codes = data["partition"].set_index("index").loc[rows, "label"].to_numpy()
    expected = roc_auc_score(codes, probs.mean(0).numpy(), multi_class="ovr", average="macro")
    assert ten.metrics["test"]["auc"] == pytest.approx(expected, abs=1e-6)


def test_config_checks_segmentation_settings() -> None:
    config = load_config(SCHEMA_PATH.parents[2] / "config.yaml")
    config["data"]["convert"]["image_size"] = 48
    config["finetune"]["tta"] = "ten_crop"
    config["tasks"]["lung"]["metric"] = "auc"
    problems = "\n".join(check_references(config))
    assert "tasks.lung: the U-Net needs slices a multiple of 32" in problems
    assert "finetune.tta: ten_crop is for classification" in problems
    assert "tasks.lung.metric: 'auc' is not a segmentation metric" in problems


def test_several_seeds_in_one_process_equal_one_process_per_seed(
    prepared, tmp_path: Path, one_thread
) -> None:
    """compute.seeds_per_job > 1: one --out with a list of the same runs as separate jobs."""
    root, name = prepared["root"], "nodule"
    write_csv(root / f"{name}.seed1.csv", make_subsets(prepared[name]["partition"], seed=1))
    settings = {**SETTINGS, "epochs": 1}

    def run(seeds: list[int], out: Path) -> int:
        argv = ["--data", str(prepared["h5"]), "--partition", str(root / f"{name}.csv")]
        argv += ["--subsets", *(str(root / f"{name}.seed{s}.csv") for s in seeds)]
        argv += ["--fraction", "1.0", "--seed", *(str(s) for s in seeds)]
        argv += ["--task", json.dumps(prepared[name]["task"]), "--settings", json.dumps(settings)]
        argv += ["--init", "scratch", "--device", "cpu", "--out", str(out)]
        return ft.main(argv)

    assert run([0, 1], tmp_path / "both.json") == 0
    both = json.loads((tmp_path / "both.json").read_text())
    assert [r["seed"] for r in both] == [0, 1]
    for seed, together in zip((0, 1), both, strict=True):
        assert run([seed], tmp_path / f"seed{seed}.json") == 0
        alone = json.loads((tmp_path / f"seed{seed}.json").read_text())
        for key in ("test", "val", "n_train", "best_epoch"):
            assert together[key] == alone[key], key
        assert [h["train_loss"] for h in together["history"]] == [
            h["train_loss"] for h in alone["history"]
        ]
    assert both[0]["test"] != both[1]["test"]  # the seeds really differ
    # One subsets file per seed, or nothing is written.
    argv_out = tmp_path / "bad.json"
    argv = ["--data", str(prepared["h5"]), "--partition", str(root / f"{name}.csv")]
    argv += ["--subsets", str(root / f"{name}.seed0.csv"), "--fraction", "1.0", "--seed", "0", "1"]
    argv += ["--task", json.dumps(prepared[name]["task"]), "--init", "scratch"]
    argv += ["--device", "cpu", "--out", str(argv_out)]
    assert ft.main(argv) == 1
    assert not argv_out.exists()


def test_supervised_init_exports_the_trained_backbone(prepared, tmp_path: Path, one_thread) -> None:
    """--export-encoder (inits with source supervised): the selected model's backbone
    becomes an encoder file that a fine-tune then starts from."""
    root, name = prepared["root"], "region"
    encoder = tmp_path / "init" / "sup_region" / "encoder.pt"
    argv = ["--data", str(prepared["h5"]), "--partition", str(root / f"{name}.csv")]
    argv += ["--subsets", str(root / f"{name}.seed0.csv"), "--fraction", "1.0", "--seed", "0"]
    argv += ["--task", json.dumps(prepared[name]["task"]), "--settings", json.dumps(SETTINGS)]
    argv += ["--init", "sup_region", "--device", "cpu"]
    metrics_out = tmp_path / "init" / "sup_region" / "metrics.json"
    assert ft.main([*argv, "--out", str(metrics_out), "--export-encoder", str(encoder)]) == 0
    info = json.loads(encoder.with_suffix(".json").read_text())
    assert info["method"] == "supervised:region" and info["backbone"] == "resnet_small"
    assert info["test"] == json.loads(metrics_out.read_text())["test"]
    state = torch.load(encoder, weights_only=True)
    assert state and not any(k.startswith("fc.") for k in state)
    fresh = ft.build_backbone("resnet_small", 1).state_dict()
    assert any(not torch.equal(state[k], fresh[k]) for k in state)  # it trained
    # A fine-tune starts from it: the backbone before training equals the file.
    model, backbone, _ = ft.build_model("binary", 1, 1, encoder, None, SETTINGS)
    assert backbone == "resnet_small"
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # Several seeds cannot export one encoder.
    subsets = str(root / f"{name}.seed0.csv")
    bad = [*argv[:5], subsets, subsets, *argv[6:9], "0", "1", *argv[10:]]
    out = tmp_path / "x.json"
    assert ft.main([*bad, "--out", str(out), "--export-encoder", str(tmp_path / "e.pt")]) == 1
    assert not out.exists() and not (tmp_path / "e.pt").exists()
