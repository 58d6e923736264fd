"""Task types of fine-tuning: one behaviour table, equal to the torch-free one and the schema."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from medssl.core import task_types as core
from medssl.core.registry import UnknownNameError
from medssl.datasets.hdf5 import read_meta
from medssl.finetuning.protocols import PROTOCOLS
from medssl.finetuning.tasktypes import (
    SEG_LOSSES,
    TASK_TYPES,
    EvalRows,
    metric_names,
    task_type,
)
from medssl.finetuning.tta import TTA_MODES
from medssl.pipeline.config import SCHEMA_PATH, check_references, load_config
from tests.finetuning.cohorts import task_type_cohort


@pytest.fixture(scope="module")
def prepared(converted_cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return task_type_cohort(converted_cohort, tmp_path_factory.mktemp("tasktypes"))


def test_behaviour_registry_equals_the_task_type_table() -> None:
    """The training behaviour exists for exactly the types of core.task_types, same metrics."""
    assert TASK_TYPES.names() == core.TASK_TYPES.names()
    for name, kind in TASK_TYPES.items():
        assert kind.name == name
        assert kind.metrics == core.TASK_TYPES[name].metrics, name
        assert kind.spec is core.TASK_TYPES[name]
    assert metric_names() == {name: spec.metrics for name, spec in core.TASK_TYPES.items()}


def test_registries_match_the_schema() -> None:
    """The schema's enums (parsed without torch) name exactly what the registries hold."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    task_props = schema["properties"]["tasks"]["additionalProperties"]["properties"]
    finetune_props = schema["properties"]["finetune"]["properties"]
    assert set(task_props["type"]["enum"]) == set(TASK_TYPES)
    assert set(finetune_props["protocol"]["enum"]) == set(PROTOCOLS)
    assert set(finetune_props["tta"]["enum"]) == set(TTA_MODES)
    assert set(finetune_props["seg_loss"]["enum"]) == set(SEG_LOSSES)
    every_metric = {m for kind in TASK_TYPES.values() for m in kind.metrics}
    assert set(task_props["metric"]["enum"]) == every_metric
    assert set(finetune_props["select_metric"]["enum"]) == every_metric | {"auto", "loss"}


def test_unknown_task_type_names_the_close_one() -> None:
    with pytest.raises(UnknownNameError, match="unknown task type 'multilable'; did you mean"):
        task_type("multilable")


def test_only_binary_refuses_more_than_two_codes() -> None:
    task = {"name": "t"}
    assert "partition labels are 0..2" in task_type("binary").codes_problem(task, 3)
    assert task_type("binary").codes_problem(task, 2) is None
    assert all(TASK_TYPES[n].codes_problem(task, 3) is None for n in TASK_TYPES if n != "binary")


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


def test_config_checks_segmentation_settings() -> None:
    config = load_config(SCHEMA_PATH.parents[2] / "config.yaml")
    config["data"]["convert"]["image_size"] = 48
    config["finetune"]["tta"] = "ten_crop"
    config["tasks"]["lung"]["metric"] = "auc"
    problems = "\n".join(check_references(config))
    assert "tasks.lung: the U-Net needs slices a multiple of 32" in problems
    assert "tasks.lung: tta ten_crop is for classification" in problems
    assert "tasks.lung.metric: 'auc' is not a segmentation metric" in problems


def test_multilabel_loss_leaves_out_minus_one_and_trains_on_soft_targets() -> None:
    kind = TASK_TYPES["multilabel"]
    targets = torch.tensor([[1.0, -1.0], [0.0, 0.7], [-1.0, 0.0], [1.0, 1.0]])
    logits = torch.linspace(-2, 2, 8).reshape(4, 2)
    criterion = kind.criterion({"class_weights": "none"}, None, 2)
    kept = targets != -1
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[kept], targets[kept])
    assert torch.allclose(criterion(logits, targets), expected)
    weighted = kind.criterion({}, targets, 2)
    # label 0: kept 1, 0, 1 -> 2 positives, 1 negative; label 1: 0.7 + 0 + 1 of 3 kept.
    assert torch.allclose(weighted.pos_weight, torch.tensor([0.5, (3 - 1.7) / 1.7]))


def test_multilabel_metrics_score_only_certain_entries() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, (60, 2)).astype(float)
    scores = np.clip(labels * 0.4 + rng.random((60, 2)) * 0.6, 0, 1)
    noisy = labels.copy()
    noisy[:10, 0], noisy[10:20, 1] = -1.0, 0.7  # not ground truths: must not count
    kind = TASK_TYPES["multilabel"]
    threshold = kind.choose_threshold(
        torch.from_numpy(noisy), torch.from_numpy(scores), {"threshold": "youden"}
    )
    rows = EvalRows(np.arange(60), np.array([f"p{i}" for i in range(60)]))
    result = kind.assess(torch.from_numpy(noisy), torch.from_numpy(scores), threshold, rows, {})
    from sklearn.metrics import roc_auc_score

    expected = np.mean(
        [
            roc_auc_score(labels[10:, 0], scores[10:, 0]),
            roc_auc_score(
                np.r_[labels[:10, 1], labels[20:, 1]], np.r_[scores[:10, 1], scores[20:, 1]]
            ),
        ]
    )
    assert result.metrics["auc"] == pytest.approx(expected)
    assert result.metrics["excluded_entries"] == 20
    assert result.arrays["labels"].dtype == np.float64
    assert (
        kind.extra_metrics({"columns": ["a", "b"]}, result.metrics)["test_excluded_entries"] == 20
    )
