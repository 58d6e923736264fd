"""The fine-tuning loop: init handling, protocols in training, selection, thresholds, flags,
determinism, defaults."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from medssl.core.registry import UnknownNameError
from medssl.datasets import mask_sources as mk
from medssl.datasets.hdf5 import load_images, read_meta
from medssl.datasets.splits import make_partition, make_subsets, read_label_table
from medssl.finetuning import loop as ft
from medssl.finetuning.metrics import youden_threshold
from medssl.finetuning.tasktypes import Threshold
from medssl.finetuning.tta import ten_crop_views
from medssl.models.backbones import build_backbone, load_encoder, save_encoder
from medssl.pipeline.config import SCHEMA_PATH
from tests.finetuning.cohorts import (
    SQUARE_SETTINGS,
    TASK_SETTINGS,
    bright_square_cohort,
    rows_of_test_split,
    task_type_cohort,
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return bright_square_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def prepared(converted_cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return task_type_cohort(converted_cohort, tmp_path_factory.mktemp("tasktypes"))


@pytest.fixture(scope="module")
def region(converted_cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The region task of the synthetic cohort and a fixed encoder to start from."""
    root = tmp_path_factory.mktemp("protocols")
    task = {"name": "region", "type": "multiclass", "column": "region", "metric": "auc"}
    table = read_label_table(converted_cohort["labels"], "sop_uid", "region")
    partition = make_partition(read_meta(converted_cohort["h5"]), table, task)
    torch.manual_seed(7)
    encoder = root / "encoder.pt"
    save_encoder(build_backbone("resnet_small", 1), encoder, "resnet_small", {"method": "test"})
    return {
        "h5": converted_cohort["h5"],
        "partition": partition,
        "subsets": make_subsets(partition, 0),
        "task": task,
        "encoder": encoder,
    }


def run(cohort: dict, **kwargs) -> ft.FinetuneResult:
    params = {
        "data": cohort["h5"],
        "partition": cohort["partition"],
        "subsets": cohort["subsets"],
        "fraction": 1.0,
        "seed": 0,
        "task": cohort["task"],
        "settings": SQUARE_SETTINGS,
        "init": "scratch",
    }
    params.update(kwargs)
    return ft.finetune(**params)


def run_region(region: dict, settings: dict) -> ft.FinetuneResult:
    return ft.finetune(
        region["h5"],
        region["partition"],
        region["subsets"],
        1.0,
        0,
        region["task"],
        {"batch_size": 32, "lr": 1e-3, "augment": False, **settings},
        "test",
        encoder=region["encoder"],
    )


# --------------------------------------------------------------------------- settings


def test_defaults_equal_the_schema_key_by_key() -> None:
    """DEFAULT_SETTINGS is the code's one source; the schema documents the same values."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]["finetune"]["properties"]
    assert set(schema) == set(ft.DEFAULT_SETTINGS)
    for key, value in ft.DEFAULT_SETTINGS.items():
        assert "default" in schema[key], key
        assert schema[key]["default"] == value, key
        assert type(schema[key]["default"]) is type(value), key


def test_choices_equal_the_schema_enums() -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]["finetune"]["properties"]
    for key, options in ft.CHOICES.items():
        assert sorted(schema[key]["enum"]) == sorted(options), key
        assert ft.DEFAULT_SETTINGS[key] in options, key


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown key"):
        ft.resolve_settings({"protocl": "linear"})
    with pytest.raises(ValueError, match="patience"):
        ft.resolve_settings({"patience": 0})
    with pytest.raises(ValueError, match="unfreeze_lr_factor"):
        ft.resolve_settings({"unfreeze_lr_factor": 2})
    with pytest.raises(ValueError, match="epochs and batch_size"):
        ft.resolve_settings({"epochs": 0})


@pytest.mark.parametrize(
    ("key", "typo", "meant"),
    [
        ("protocol", "lineer", "linear"),
        ("optimizer", "adamm", "adam"),
        ("select_metric", "dise", "dice"),
        ("tta", "flipp", "flip"),
        ("seg_loss", "dice-bce", "dice_bce"),
        ("class_weights", "balance", "balanced"),
    ],
)
def test_a_misspelt_name_is_refused_with_the_close_one(key: str, typo: str, meant: str) -> None:
    with pytest.raises(
        UnknownNameError, match=rf"finetune\.{key} '{typo}'; did you mean '{meant}'"
    ):
        ft.resolve_settings({key: typo})


def test_select_metric_must_belong_to_the_task_type() -> None:
    kind = ft.task_type("segmentation")
    settings = ft.resolve_settings({"select_metric": "auc"})
    with pytest.raises(UnknownNameError, match="'x': select_metric: unknown segmentation metric"):
        ft.select_metric_for(settings, {"name": "x"}, kind)
    assert ft.select_metric_for(ft.resolve_settings({}), {"name": "x"}, kind) == "dice"
    region = {"name": "r", "metric": "f1"}
    assert ft.select_metric_for(ft.resolve_settings({}), region, ft.task_type("multiclass")) == "f1"


def test_tasks_are_checked_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="JSON object with 'name' and 'type'"):
        ft.check_task(["binary"])
    with pytest.raises(ValueError, match="JSON object with 'name' and 'type'"):
        ft.check_task({"type": "binary"})
    with pytest.raises(ValueError, match="multilabel task 'f' needs 'columns'"):
        ft.check_task({"name": "f", "type": "multilabel"})
    with pytest.raises(UnknownNameError, match="did you mean 'binary'"):
        ft.check_task({"name": "n", "type": "binery"})
    assert ft.check_task({"name": "n", "type": "binary"}).name == "binary"


# --------------------------------------------------------------------------- runs


def test_scratch_and_encoder_inits(cohort: dict) -> None:
    # Before any training, an encoder init carries the encoder's weights, scratch does not.
    saved = torch.load(cohort["encoder"], weights_only=True)
    from_encoder, name, info = ft.build_model("binary", 2, 1, cohort["encoder"], None)
    assert name == "resnet_small" and info["method"] == "test"
    torch.manual_seed(0)
    scratch, name, info = ft.build_model("binary", 2, 1, None, None)
    assert name == "resnet_small" and info is None
    key = "layer1.0.conv1.weight"
    assert torch.equal(from_encoder.backbone.state_dict()[key], saved[key])
    assert not torch.equal(scratch.backbone.state_dict()[key], saved[key])
    with pytest.raises(ft.FinetuneError, match="encoder takes 1 input channels, the data has 3"):
        ft.build_model("binary", 1, 3, cohort["encoder"], None)


def test_linear_protocol_freezes_backbone(cohort: dict) -> None:
    settings = {**SQUARE_SETTINGS, "protocol": "linear", "lr": 1e-2}
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


def test_same_seed_same_numbers(cohort: dict) -> None:
    first, second = run(cohort), run(cohort)
    assert first.metrics["test"] == second.metrics["test"]
    assert first.metrics["history"] == second.metrics["history"]
    third = run(cohort, seed=1)
    assert third.metrics["history"] != first.metrics["history"]


def test_the_named_steps_are_the_run(cohort: dict) -> None:
    """prepare_run, fit, score_test and metrics_record in a row give finetune's numbers."""
    whole = run(cohort)
    args = (cohort["h5"], cohort["partition"], cohort["subsets"], 1.0, 0, cohort["task"])
    prepared = ft.prepare_run(*args, SQUARE_SETTINGS, "scratch")
    counts = tuple(whole.metrics[key] for key in ("n_train", "n_val", "n_test"))
    assert prepared.data.sizes == counts
    fitted = ft.fit(prepared)
    metrics = ft.metrics_record(prepared, fitted, ft.score_test(prepared, fitted))
    for key in ("test", "val", "history", "best_epoch", "n_train_patients", "settings"):
        assert metrics[key] == whole.metrics[key], key


def test_learns_the_bright_square(cohort: dict) -> None:
    settings = {**SQUARE_SETTINGS, "epochs": 8, "batch_size": 8, "augment": False}
    result = run(cohort, settings=settings)
    assert result.metrics["val"]["auc"] > 0.9 and result.metrics["test"]["auc"] > 0.9
    assert result.metrics["history"][-1]["train_loss"] < result.metrics["history"][0]["train_loss"]


def test_divergence_is_an_error(cohort: dict) -> None:
    with pytest.raises(ft.FinetuneError, match="diverged"):
        run(cohort, settings={**SQUARE_SETTINGS, "lr": 1e30, "optimizer": "sgd"})


def test_multiclass_run(cohort: dict) -> None:
    part = cohort["partition"].copy()
    # Three classes: negative, square, and "square in an odd patient's first slice".
    part.loc[(part["label"] == 1) & (part["index"] % 12 == 0), "label"] = 2
    task = {"name": "three", "type": "multiclass"}
    result = run(cohort, partition=part, task=task, settings={**SQUARE_SETTINGS, "epochs": 1})
    assert result.model.head.out_features == 3
    test = result.metrics["test"]
    assert 0 <= test["accuracy"] <= 1 and 0 <= test["f1"] <= 1
    assert math.isnan(test["auc"]) or 0 <= test["auc"] <= 1
    with pytest.raises(
        ft.FinetuneError, match="binary task 'nodule' but partition labels are 0..2"
    ):
        run(cohort, partition=part)


def test_augment_batch_is_seeded_and_keeps_shape() -> None:
    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    first = ft.augment_batch(images, torch.Generator().manual_seed(0))
    second = ft.augment_batch(images, torch.Generator().manual_seed(0))
    assert first.shape == images.shape and torch.equal(first, second)


def test_balanced_class_weights_equalise_class_totals() -> None:
    binary = torch.tensor([0, 0, 0, 1])
    assert ft.balanced_class_weights(binary, "binary", 1).tolist() == [3.0]
    labels = torch.tensor([0, 0, 0, 0, 2, 2])
    weights = ft.balanced_class_weights(labels, "multiclass", 3)
    totals = torch.bincount(labels, minlength=3).float() * weights
    assert weights[1] == 0  # absent from the subset
    assert torch.allclose(totals[[0, 2]], torch.full((2,), 3.0))


def test_segmentation_dice_matches_a_numpy_reference(prepared, one_thread) -> None:
    """The run's test Dice is the mean per-patient Dice of its model's thresholded output."""
    data = prepared["lung"]
    result = ft.finetune(
        prepared["h5"],
        data["partition"],
        make_subsets(data["partition"], 0),
        1.0,
        0,
        data["task"],
        {**TASK_SETTINGS, "epochs": 1},
        "scratch",
        masks=prepared["masks"],
    )
    rows = rows_of_test_split(prepared, "lung")
    result.model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(result.model(load_images(prepared["h5"], rows))[:, 0]).numpy()
    truth = mk.load_masks(prepared["masks"], rows).astype(bool)
    pred = probs >= 0.5
    patients = data["partition"].set_index("index").loc[rows, "patient_id"].to_numpy()
    dice, iou = [], []
    for patient in np.unique(patients):
        mine = patients == patient
        ref, out = truth[mine], pred[mine]
        if ref.any():  # a patient without reference foreground is left out
            inter = (ref & out).sum()
            dice.append(2 * inter / (ref.sum() + out.sum()))
            iou.append(inter / (ref | out).sum())
    test = result.metrics["test"]
    assert test["dice"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert test["iou"] == pytest.approx(np.mean(iou), abs=1e-6)
    expected_global = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert test["dice_global"] == pytest.approx(expected_global, abs=1e-6)
    detail = result.metrics["test_detail"]
    assert detail["n_cases"] == len(np.unique(patients)) and detail["n_cases_scored"] == len(dice)
    assert result.metrics["threshold"] == 0.5 and result.metrics["threshold_rule"] == "fixed"
    assert result.metrics["select_metric"] == "dice"
    np.testing.assert_array_equal(result.predictions["sample_index"], rows)
    assert sorted(result.predictions["case_id"]) == sorted(np.unique(patients))


def test_metrics_json_of_a_ten_crop_run(prepared, one_thread) -> None:
    data = prepared["region"]
    settings = {**TASK_SETTINGS, "epochs": 1}

    def region_run(settings: dict) -> ft.FinetuneResult:
        subsets = make_subsets(data["partition"], 0)
        return ft.finetune(
            prepared["h5"], data["partition"], subsets, 1.0, 0, data["task"], settings, "scratch"
        )

    plain = region_run(settings)
    ten = region_run({**settings, "tta": "ten_crop"})
    assert plain.metrics["val"] == ten.metrics["val"]  # validation never uses TTA
    rows = rows_of_test_split(prepared, "region")
    images = load_images(prepared["h5"], rows)
    ten.model.eval()
    with torch.no_grad():
        probs = torch.stack([torch.softmax(ten.model(v), 1) for v in ten_crop_views(images)])
    codes = data["partition"].set_index("index").loc[rows, "label"].to_numpy()
    expected = roc_auc_score(codes, probs.mean(0).numpy(), multi_class="ovr", average="macro")
    assert ten.metrics["test"]["auc"] == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- protocols in training


def test_frozen_epochs_leave_the_backbone_unchanged(region, monkeypatch, one_thread) -> None:
    # Keep the last epoch's weights, so the test sees what training did to them.
    monkeypatch.setattr(ft, "_is_better", lambda value, best, metric: True)
    start, _ = load_encoder(region["encoder"])
    start_state = start.state_dict()
    settings = {"protocol": "frozen_then_unfrozen", "freeze_epochs": 2}
    frozen = run_region(region, {**settings, "epochs": 2})
    for key, value in frozen.model.backbone.state_dict().items():
        torch.testing.assert_close(value, start_state[key], rtol=0, atol=0, msg=key)
    assert [h["backbone_trained"] for h in frozen.metrics["history"]] == [False, False]
    head_start = run_region(region, {**settings, "epochs": 1}).model.head.weight
    assert not torch.equal(frozen.model.head.weight, head_start)  # the head trained

    unfrozen = run_region(region, {**settings, "epochs": 4})
    history = unfrozen.metrics["history"]
    assert [h["backbone_trained"] for h in history] == [False, False, True, True]
    assert [h["lr"]["backbone"] for h in history] == pytest.approx([0, 0, 1e-4, 2e-4])
    assert [h["lr"]["head"] for h in history] == pytest.approx([1e-3, 1e-3, 1e-4, 2e-4])
    changed = [
        key
        for key, value in unfrozen.model.backbone.state_dict().items()
        if not torch.equal(value, start_state[key])
    ]
    assert any(key.endswith("conv1.weight") for key in changed)
    assert any(key.endswith("running_mean") for key in changed)


def scripted_evaluation(value: float) -> ft.Evaluation:
    """A validation result with every classification metric at ``value`` (no threshold)."""
    names = ("auc", "accuracy", "f1", "balanced_accuracy")
    return ft.Evaluation({**dict.fromkeys(names, value), "loss": 1 - value}, Threshold(None, "x"))


def test_early_stopping_restores_the_best_epoch(region, monkeypatch, one_thread) -> None:
    """Scripted val AUCs 0.5, 0.9, 0.6, 0.7: best epoch 2, patience 2 stops after epoch 4."""
    script = [0.5, 0.9, 0.6, 0.7]
    snapshots: list[dict[str, torch.Tensor]] = []
    real_evaluate = ft.evaluate

    def scripted(model, images, targets, kind, tta="none", settings=None, **rows_threshold):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if len(snapshots) <= len(script):
            return scripted_evaluation(script[len(snapshots) - 1])
        return real_evaluate(model, images, targets, kind, tta, settings, **rows_threshold)

    monkeypatch.setattr(ft, "evaluate", scripted)
    result = run_region(region, {"epochs": 10, "patience": 2})
    assert result.metrics["best_epoch"] == 2
    assert result.metrics["epochs_run"] == 4
    assert result.metrics["stopped_early"] is True
    assert len(snapshots) == 5  # four validations, then the test
    for key, value in snapshots[-1].items():  # tested with epoch 2's weights
        torch.testing.assert_close(value, snapshots[1][key], rtol=0, atol=0, msg=key)
    assert not torch.equal(snapshots[3]["head.weight"], snapshots[1]["head.weight"])


def test_early_stopping_waits_for_the_unfrozen_backbone(region, monkeypatch, one_thread) -> None:
    script = iter([0.9, 0.5, 0.5, 0.5, 0.5, 0.5])

    def scripted(model, images, targets, kind, tta="none", settings=None, **rows_threshold):
        return scripted_evaluation(next(script, 0.5))

    monkeypatch.setattr(ft, "evaluate", scripted)
    settings = {"protocol": "frozen_then_unfrozen", "freeze_epochs": 3, "patience": 1}
    result = run_region(region, {**settings, "epochs": 6})
    assert result.metrics["epochs_run"] == 4  # not before the first unfrozen epoch
    assert result.metrics["best_epoch"] == 1


# --------------------------------------------------------------------------- thresholds, flags


def test_the_validation_threshold_is_applied_to_the_test_split(cohort: dict) -> None:
    """The selected epoch's val scores fix the threshold; the test predictions use it as is."""
    settings = {**SQUARE_SETTINGS, "epochs": 3, "augment": False}
    args = (cohort["h5"], cohort["partition"], cohort["subsets"], 1.0, 0, cohort["task"])
    prepared = ft.prepare_run(*args, settings, "scratch")
    fitted = ft.fit(prepared)
    test = ft.score_test(prepared, fitted)  # the selected state is now loaded
    record = ft.metrics_record(prepared, fitted, test)
    val_probs, _ = ft.predict(prepared.model, prepared.data.x_val, prepared.kind)
    val_labels = prepared.data.y_val.numpy()
    expected = youden_threshold(val_labels, val_probs.numpy())
    assert record["threshold"] == pytest.approx(expected) and record["threshold_rule"] == "youden"
    scores, labels = test.arrays["scores"], test.arrays["labels"]
    pred = (scores >= record["threshold"]).astype(int)
    np.testing.assert_array_equal(test.arrays["predictions"], pred)
    assert record["test"]["accuracy"] == pytest.approx(np.mean(pred == labels))
    assert record["test"]["balanced_accuracy"] == pytest.approx(
        (pred[labels == 1].mean() + (1 - pred[labels == 0]).mean()) / 2
    )
    fixed = run(cohort, settings={**settings, "threshold": 0.5})
    assert fixed.metrics["threshold"] == 0.5 and fixed.metrics["threshold_rule"] == 0.5
    assert fixed.metrics["test"]["auc"] == record["test"]["auc"]  # same model, other cut


def test_a_constant_model_is_flagged_and_warned_about(cohort, monkeypatch, caplog) -> None:
    real_predict = ft.predict

    def constant(model, images, kind, tta="none"):
        probs, logits = real_predict(model, images, kind, tta)
        return torch.full_like(probs, 0.3), logits

    monkeypatch.setattr(ft, "predict", constant)
    result = run(cohort, settings={**SQUARE_SETTINGS, "epochs": 1})
    assert result.metrics["flags"] == ["constant_prediction", "single_class_predicted"]
    assert result.metrics["test"]["auc"] == 0.5  # all tied
    assert result.metrics["test"]["balanced_accuracy"] == 0.5
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "run scratch/nodule/frac1.0/seed0: every test score is the same" in m for m in warned
    )
    monkeypatch.undo()
    assert run(cohort).metrics["flags"] == []  # the same run, scored on its real outputs


def test_pretrain_seed_comes_from_the_encoder_sidecar() -> None:
    pretrained = {"method": "simclr", "provenance": {"stage": "pretrain", "seed": 3}}
    assert ft.pretrain_seed(pretrained) == 3
    supervised = {"method": "supervised:region", "provenance": {"stage": "finetune", "seed": 1}}
    assert ft.pretrain_seed(supervised) == 1
    imported = {"method": "import:torchvision", "provenance": {"stage": "import_init", "seed": 0}}
    assert ft.pretrain_seed(imported) is None
    assert ft.pretrain_seed(None) is None  # scratch
    assert ft.pretrain_seed({"method": "test"}) is None  # no provenance: unknown, not 0
