"""Fine-tuning protocols: frozen-then-unfrozen schedule, early stopping and model selection."""

from __future__ import annotations

import pytest
import torch

from medssl.finetuning import loop as ft
from medssl.datasets.hdf5 import read_meta
from medssl.models.backbones import build_backbone, load_encoder, save_encoder
from medssl.finetuning.protocols import make_protocol
from medssl.datasets.splits import make_partition, make_subsets, read_label_table

SETTINGS = {"batch_size": 32, "lr": 1e-3, "augment": False}


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


def run(region: dict, settings: dict) -> ft.FinetuneResult:
    return ft.finetune(
        region["h5"],
        region["partition"],
        region["subsets"],
        1.0,
        0,
        region["task"],
        {**SETTINGS, **settings},
        "test",
        encoder=region["encoder"],
    )


def test_frozen_then_unfrozen_lr_schedule() -> None:
    settings = ft.resolve_settings({"protocol": "frozen_then_unfrozen", "freeze_epochs": 10})
    protocol = make_protocol(settings)
    plans = [protocol.plan(epoch) for epoch in range(1, 17)]
    assert [p.train_backbone for p in plans] == [False] * 10 + [True] * 6
    assert [p.lr_factor["head"] for p in plans[:10]] == [1.0] * 10
    assert [p.lr_factor["backbone"] for p in plans[:10]] == [0.0] * 10
    ramp = [p.lr_factor["backbone"] for p in plans[10:]]
    assert ramp == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert [p.lr_factor["head"] for p in plans[10:]] == ramp
    assert protocol.earliest_stop() == 11


def test_frozen_epochs_leave_the_backbone_unchanged(region, monkeypatch, one_thread) -> None:
    # Keep the last epoch's weights, so the test sees what training did to them.
    monkeypatch.setattr(ft, "_is_better", lambda value, best, metric: True)
    start, _ = load_encoder(region["encoder"])
    start_state = start.state_dict()
    settings = {"protocol": "frozen_then_unfrozen", "freeze_epochs": 2}
    frozen = run(region, {**settings, "epochs": 2})
    for key, value in frozen.model.backbone.state_dict().items():
        torch.testing.assert_close(value, start_state[key], rtol=0, atol=0, msg=key)
    assert [h["backbone_trained"] for h in frozen.metrics["history"]] == [False, False]
    head_start = run(region, {**settings, "epochs": 1}).model.head.weight
    assert not torch.equal(frozen.model.head.weight, head_start)  # the head trained

    unfrozen = run(region, {**settings, "epochs": 4})
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


def test_early_stopping_restores_the_best_epoch(region, monkeypatch, one_thread) -> None:
    """Scripted val AUCs 0.5, 0.9, 0.6, 0.7: best epoch 2, patience 2 stops after epoch 4."""
    script = [0.5, 0.9, 0.6, 0.7]
    snapshots: list[dict[str, torch.Tensor]] = []
    real_evaluate = ft.evaluate

    def scripted(model, images, targets, kind, tta="none", settings=None):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if len(snapshots) <= len(script):
            value = script[len(snapshots) - 1]
            return {"auc": value, "accuracy": value, "f1": value, "loss": 1 - value}
        return real_evaluate(model, images, targets, kind, tta, settings)

    monkeypatch.setattr(ft, "evaluate", scripted)
    result = run(region, {"epochs": 10, "patience": 2})
    assert result.metrics["best_epoch"] == 2
    assert result.metrics["epochs_run"] == 4
    assert result.metrics["stopped_early"] is True
    assert len(snapshots) == 5  # four validations, then the test
    for key, value in snapshots[-1].items():  # tested with epoch 2's weights
        torch.testing.assert_close(value, snapshots[1][key], rtol=0, atol=0, msg=key)
    assert not torch.equal(snapshots[3]["head.weight"], snapshots[1]["head.weight"])


def test_early_stopping_waits_for_the_unfrozen_backbone(region, monkeypatch, one_thread) -> None:
    script = iter([0.9, 0.5, 0.5, 0.5, 0.5, 0.5])

    def scripted(model, images, targets, kind, tta="none", settings=None):
        value = next(script, 0.5)
        return {"auc": value, "accuracy": value, "f1": value, "loss": 1 - value}

    monkeypatch.setattr(ft, "evaluate", scripted)
    settings = {"protocol": "frozen_then_unfrozen", "freeze_epochs": 3, "patience": 1}
    result = run(region, {**settings, "epochs": 6})
    assert result.metrics["epochs_run"] == 4  # not before the first unfrozen epoch
    assert result.metrics["best_epoch"] == 1


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="protocol"):
        ft.resolve_settings({"protocol": "frozen"})
    with pytest.raises(ValueError, match="patience"):
        ft.resolve_settings({"patience": 0})
    with pytest.raises(ValueError, match="unfreeze_lr_factor"):
        ft.resolve_settings({"unfreeze_lr_factor": 2})
    with pytest.raises(ValueError, match="not a segmentation metric"):
        kind = ft.task_type("segmentation")
        ft.select_metric_for(ft.resolve_settings({"select_metric": "auc"}), {"name": "x"}, kind)
