"""The knn protocol and layer-wise lr decay through the fine-tuning loop: a probe run trains
nothing and scores with neighbour votes, streamed like any run; decay sets per-layer lrs."""

from __future__ import annotations

import pytest

from medssl.datasets.splits import read_subsets
from medssl.finetuning import loop as ft
from medssl.finetuning.knn import NeighbourClassifier
from tests.finetuning.cohorts import TASK_SETTINGS, task_type_cohort


@pytest.fixture(scope="module")
def prepared(converted_cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return task_type_cohort(converted_cohort, tmp_path_factory.mktemp("probe"))


def args_for(prepared: dict, name: str, settings: dict) -> dict:
    return {
        "data": prepared["h5"],
        "partition": prepared[name]["partition"],
        "subsets": read_subsets(prepared["root"] / f"{name}.seed0.csv"),
        "fraction": 1.0,
        "seed": 0,
        "task": prepared[name]["task"],
        "settings": settings,
        "init": "scratch",
    }


@pytest.mark.parametrize("name", ["nodule", "region", "findings"])
def test_a_knn_run_trains_nothing_and_scores_with_votes(prepared: dict, name: str) -> None:
    settings = {**TASK_SETTINGS, "protocol": "knn", "knn_k": 5}
    result = ft.finetune(**args_for(prepared, name, settings))
    assert isinstance(result.model, NeighbourClassifier)
    assert result.metrics["epochs_run"] == 0 and result.metrics["history"] == []
    assert result.metrics["best_epoch"] is None
    assert 0 <= result.metrics["test"]["auc"] <= 1
    # A streamed run (budget far below the data) gives the same probe and scores.
    with ft.job_data(
        prepared["h5"], None, prepared[name]["task"], settings, mode="streamed"
    ) as job:
        streamed = ft.finetune(**args_for(prepared, name, settings), job=job)
    assert streamed.metrics["test"] == result.metrics["test"]


def test_knn_refuses_a_segmentation_task(prepared: dict) -> None:
    args = args_for(prepared, "lung", {**TASK_SETTINGS, "protocol": "knn"})
    with pytest.raises(ValueError, match="knn|kNN"):
        ft.finetune(**args, masks=prepared["masks"])


def test_layer_decay_sets_a_lower_lr_on_earlier_stages(prepared: dict) -> None:
    settings = {**TASK_SETTINGS, "epochs": 1, "layer_decay": 0.5}
    result = ft.finetune(**args_for(prepared, "nodule", settings))
    lrs = result.metrics["history"][0]["lr"]
    base = TASK_SETTINGS["lr"]
    # resnet_small: stem layer 0, stages 1-4, head 5 -> stage j at lr * 0.5 ** (5 - j).
    assert lrs["head/layer5"] == pytest.approx(base)
    assert lrs["backbone/layer4"] == pytest.approx(base * 0.5)
    assert lrs["backbone/layer0"] == pytest.approx(base * 0.5**5)
    plain = ft.finetune(**args_for(prepared, "nodule", {**settings, "layer_decay": 1.0}))
    assert set(plain.metrics["history"][0]["lr"]) == {"backbone", "head"}


def test_layer_decay_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match="layer_decay"):
        ft.resolve_settings({"layer_decay": 1.5})
    assert ft.resolve_settings({})["layer_decay"] == 1.0
