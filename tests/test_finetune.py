"""Stage ``finetune``: the metrics.json contract, the predictions file, seeds per job,
encoder export, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl import finetune
from medssl.core.files import write_csv
from medssl.core.provenance import record
from medssl.datasets.splits import make_subsets
from medssl.finetuning import loop as ft
from medssl.finetuning.metrics import (
    OverlapCounts,
    classification_metrics,
    load_predictions,
    metrics_from_counts,
)
from medssl.models.backbones import build_backbone, save_encoder
from tests.finetuning.cohorts import (
    SQUARE_SETTINGS,
    TASK_SETTINGS,
    TASKS,
    bright_square_cohort,
    square_cli_args,
    task_type_cohort,
)

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
    "pretrain_seed",
    "threshold",
    "threshold_rule",
    "flags",
    "metric_definitions",
    "test_predictions",
    "val",
    "test",
    "history",
    "settings",
    "provenance",
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return bright_square_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def prepared(converted_cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return task_type_cohort(converted_cohort, tmp_path_factory.mktemp("tasktypes"))


def task_argv(prepared: dict, name: str, seeds: list[int], settings: dict = TASK_SETTINGS) -> list:
    """Arguments of task ``name`` of the synthetic cohort (add ``--out``)."""
    root, task = prepared["root"], prepared[name]["task"]
    argv = ["--data", str(prepared["h5"]), "--partition", str(root / f"{name}.csv")]
    argv += ["--subsets", *(str(root / f"{name}.seed{s}.csv") for s in seeds)]
    argv += ["--fraction", "1.0", "--seed", *(str(s) for s in seeds)]
    argv += ["--task", json.dumps(task), "--settings", json.dumps(settings)]
    return [*argv, "--init", "scratch", "--device", "cpu"]


def test_writes_documented_metrics(cohort: dict, tmp_path: Path) -> None:
    out = tmp_path / "scratch" / "metrics.json"
    assert finetune.main([*square_cli_args(cohort, out), "--init", "scratch"]) == 0
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
        assert set(metrics[split]) == {"auc", "accuracy", "f1", "balanced_accuracy"}
        assert all(0 <= v <= 1 for v in metrics[split].values())
    assert set(metrics["metric_definitions"]) == set(metrics["test"])
    assert metrics["threshold_rule"] == "youden" and 0 <= metrics["threshold"] <= 1
    assert isinstance(metrics["flags"], list) and metrics["pretrain_seed"] is None
    # The predictions file beside metrics.json reproduces the test metrics.
    assert metrics["test_predictions"] == "test_predictions.npz"
    saved = load_predictions(out.parent / "test_predictions.npz")
    test_rows = part.loc[part["split"] == "test"].sort_values("index")
    np.testing.assert_array_equal(saved["sample_index"], test_rows["index"])
    assert saved["patient_id"].tolist() == test_rows["patient_id"].tolist()
    np.testing.assert_array_equal(saved["labels"], test_rows["label"])
    assert saved["threshold"] == metrics["threshold"]
    again = classification_metrics("binary", saved["labels"], saved["scores"], metrics["threshold"])
    assert again == pytest.approx(metrics["test"], abs=1e-12)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert {"train_loss", "val_auc", "val_accuracy", "val_f1", "val_loss"} <= set(
        metrics["history"][0]
    )
    assert metrics["settings"]["protocol"] == "full" and metrics["settings"]["epochs"] == 2
    assert metrics["provenance"]["stage"] == "finetune" and metrics["provenance"]["seed"] == 0
    assert metrics["provenance"]["settings"]["threads"] == 1


def test_encoder_init_is_recorded(cohort: dict, tmp_path: Path) -> None:
    out = tmp_path / "simclr" / "metrics.json"
    args = [*square_cli_args(cohort, out), "--init", "simclr", "--encoder", str(cohort["encoder"])]
    assert finetune.main(args) == 0
    run_info = json.loads(out.read_text())["provenance"]["settings"]
    assert run_info["encoder"] == str(cohort["encoder"])
    assert run_info["encoder_sidecar"]["method"] == "test"
    assert run_info["backbone"] == "resnet_small"
    assert json.loads(out.read_text())["pretrain_seed"] is None  # the sidecar records no seed


def test_pretrain_seed_of_a_pretrained_encoder(cohort: dict, tmp_path: Path) -> None:
    """An encoder whose sidecar records its pre-training's seed passes it to metrics.json."""
    encoder = tmp_path / "init" / "simclr" / "encoder.pt"
    torch.manual_seed(5)
    info = {"method": "simclr", "provenance": record("pretrain", {"epochs": 1}, 11)}
    save_encoder(build_backbone("resnet_small", 1), encoder, "resnet_small", info)
    out = tmp_path / "simclr" / "metrics.json"
    args = [*square_cli_args(cohort, out), "--init", "simclr", "--encoder", str(encoder)]
    assert finetune.main(args) == 0
    assert json.loads(out.read_text())["pretrain_seed"] == 11


def test_divergence_is_one_error_line_and_writes_nothing(cohort, tmp_path, caplog) -> None:
    out = tmp_path / "nan" / "metrics.json"
    settings = {**SQUARE_SETTINGS, "lr": 1e30}  # the default optimizer, adam
    assert finetune.main([*square_cli_args(cohort, out, settings), "--init", "scratch"]) == 1
    assert not out.exists() and not out.parent.exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("error: finetune: ")
    assert "diverged" in errors[0]


def test_bad_settings_exit_1_and_bad_json_is_a_usage_error(cohort, tmp_path, capsys) -> None:
    out = tmp_path / "bad" / "metrics.json"
    assert finetune.main([*square_cli_args(cohort, out, {"epochs": 0}), "--init", "scratch"]) == 1
    assert not out.exists()
    argv = square_cli_args(cohort, out)
    argv[argv.index("--settings") + 1] = "[1, 2]"
    with pytest.raises(SystemExit) as exit_info:
        finetune.main([*argv, "--init", "scratch"])
    assert exit_info.value.code == 2 and "expected a JSON object" in capsys.readouterr().err
    argv[argv.index("--settings") + 1] = "{}"
    argv[argv.index("--task") + 1] = '"nodule"'
    assert finetune.main([*argv, "--init", "scratch"]) == 1
    assert not out.exists()


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_type_trains_and_writes_metrics(prepared, name, tmp_path, one_thread) -> None:
    task = prepared[name]["task"]
    out = tmp_path / "metrics.json"
    argv = [*task_argv(prepared, name, [0]), "--out", str(out)]
    if task["type"] == "segmentation":
        assert finetune.main(argv) == 1  # no masks: an error, no file
        assert not out.exists()
        argv += ["--masks", str(prepared["masks"])]
    assert finetune.main(argv) == 0
    metrics = json.loads(out.read_text())
    kind = ft.TASK_TYPES[task["type"]]
    assert metrics["task_type"] == task["type"]
    assert set(metrics["test"]) == set(kind.metrics)
    assert metrics["select_metric"] == ("dice" if task["type"] == "segmentation" else "auc")
    assert len(metrics["history"]) == 2
    for value in metrics["test"].values():
        assert value is None or 0 <= value <= 1
    if task["type"] == "multilabel":
        assert set(metrics["test_auc_per_label"]) == set(task["columns"])
        assert set(metrics["threshold"]) == set(task["columns"])
    saved = load_predictions(out.parent / metrics["test_predictions"])
    assert len(saved["sample_index"]) == metrics["n_test"]
    if task["type"] == "segmentation":
        counts = OverlapCounts(
            saved["slice_intersection"],
            saved["slice_pred_sum"],
            saved["slice_ref_sum"],
            int(saved["pixels_per_slice"]),
        )
        again = metrics_from_counts(counts, saved["patient_id"], "exclude")
        assert {k: again[k] for k in metrics["test"]} == pytest.approx(metrics["test"])
        assert saved["case_id"].tolist() == sorted(set(saved["patient_id"].tolist()))
        assert saved["intersection"].sum() == saved["slice_intersection"].sum()
        assert metrics["test_detail"]["n_cases"] == len(saved["case_id"])


def test_several_seeds_in_one_process_equal_one_process_per_seed(
    prepared, tmp_path: Path, one_thread
) -> None:
    """compute.seeds_per_job > 1: one --out with a list of the same runs as separate jobs."""
    name = "nodule"
    root = prepared["root"]
    write_csv(root / f"{name}.seed1.csv", make_subsets(prepared[name]["partition"], seed=1))
    settings = {**TASK_SETTINGS, "epochs": 1}

    def run(seeds: list[int], out: Path) -> int:
        return finetune.main([*task_argv(prepared, name, seeds, settings), "--out", str(out)])

    assert run([0, 1], tmp_path / "both.json") == 0
    both = json.loads((tmp_path / "both.json").read_text())
    assert [r["seed"] for r in both] == [0, 1]
    names = [r["test_predictions"] for r in both]
    assert names == ["test_predictions_seed0.npz", "test_predictions_seed1.npz"]
    assert all((tmp_path / name).exists() for name in names)
    for seed, together in zip((0, 1), both, strict=True):
        assert run([seed], tmp_path / f"seed{seed}.json") == 0
        alone = json.loads((tmp_path / f"seed{seed}.json").read_text())
        for key in ("test", "val", "n_train", "best_epoch"):
            assert together[key] == alone[key], key
        assert [h["train_loss"] for h in together["history"]] == [
            h["train_loss"] for h in alone["history"]
        ]
    assert both[0]["test"] != both[1]["test"]  # the seeds really differ
    # One subsets file per seed, each seed once, or nothing is written.
    bad_out = tmp_path / "bad.json"
    argv = task_argv(prepared, name, [0], settings)
    seeds_at = argv.index("--seed") + 1
    assert (
        finetune.main([*argv[:seeds_at], "0", "1", *argv[seeds_at + 1 :], "--out", str(bad_out)])
        == 1
    )
    assert finetune.main([*task_argv(prepared, name, [0, 0]), "--out", str(bad_out)]) == 1
    assert not bad_out.exists()


def test_supervised_init_exports_the_trained_backbone(prepared, tmp_path: Path, one_thread) -> None:
    """--export-encoder (inits with source supervised): the selected model's backbone
    becomes an encoder file that a fine-tune then starts from."""
    name = "region"
    encoder = tmp_path / "init" / "sup_region" / "encoder.pt"
    argv = [*task_argv(prepared, name, [0]), "--init", "sup_region"]
    metrics_out = tmp_path / "init" / "sup_region" / "metrics.json"
    assert finetune.main([*argv, "--out", str(metrics_out), "--export-encoder", str(encoder)]) == 0
    info = json.loads(encoder.with_suffix(".json").read_text())
    assert info["method"] == "supervised:region" and info["backbone"] == "resnet_small"
    assert info["init"] == "sup_region" and info["start_encoder"] is None
    assert info["test"] == json.loads(metrics_out.read_text())["test"]
    state = torch.load(encoder, weights_only=True)
    assert state and not any(k.startswith("fc.") for k in state)
    fresh = build_backbone("resnet_small", 1).state_dict()
    assert any(not torch.equal(state[k], fresh[k]) for k in state)  # it trained
    # A fine-tune starts from it: the backbone before training equals the file.
    model, backbone, _ = ft.build_model("binary", 1, 1, encoder, None, TASK_SETTINGS)
    assert backbone == "resnet_small"
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # Several seeds cannot export one encoder.
    root = prepared["root"]
    (root / f"{name}.seed1.csv").write_text((root / f"{name}.seed0.csv").read_text())
    bad = task_argv(prepared, name, [0, 1])
    out = tmp_path / "x.json"
    assert finetune.main([*bad, "--out", str(out), "--export-encoder", str(tmp_path / "e.pt")]) == 1
    assert not out.exists() and not (tmp_path / "e.pt").exists()


def test_the_seeds_of_one_job_share_one_read_of_val_and_test(
    prepared, tmp_path: Path, monkeypatch, one_thread
) -> None:
    """compute.seeds_per_job > 1: the fixed splits are read once for every seed of the job."""
    from medssl.finetuning import streaming

    name = "nodule"
    write_csv(
        prepared["root"] / f"{name}.seed1.csv", make_subsets(prepared[name]["partition"], seed=1)
    )
    held: list[int] = []
    real_hold = streaming.JobData.hold

    def counting(self, rows):
        held.append(len(rows))
        return real_hold(self, rows)

    monkeypatch.setattr(streaming.JobData, "hold", counting)
    settings = {**TASK_SETTINGS, "epochs": 1}
    out = tmp_path / "both.json"
    assert finetune.main([*task_argv(prepared, name, [0, 1], settings), "--out", str(out)]) == 0
    runs = json.loads(out.read_text())
    n_fixed = runs[0]["n_val"] + runs[0]["n_test"]
    assert sum(held) == n_fixed + runs[0]["n_train"] + runs[1]["n_train"]
    assert len(held) == 4  # val and test once, then each seed's training subset
    # A budget that cannot hold one batch is refused by name, and nothing is written.
    tiny = {**settings, "memory_budget_gb": 1e-7}
    bad = tmp_path / "bad.json"
    assert finetune.main([*task_argv(prepared, name, [0], tiny), "--out", str(bad)]) == 1
    assert not bad.exists()
