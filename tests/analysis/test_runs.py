"""analysis.runs: metrics.json -> tidy rows, strict validation, deterministic order."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from medssl.analysis.runs import COLUMNS, SORT_KEYS, MetricsError, build_runs
from tests.analysis.metrics_files import payload, write_metrics, write_sweep


@pytest.fixture
def sweep(tmp_path: Path) -> list[Path]:
    return write_sweep(tmp_path / "finetune")


def test_rows_one_per_run_and_test_metric(sweep: list[Path]) -> None:
    runs = build_runs(sweep)
    assert list(runs.columns) == list(COLUMNS)
    assert len(runs) == 8 * 2
    # Only test metrics, never the validation ones.
    assert set(runs["metric"]) == {"auc", "accuracy"}
    row = runs[
        (runs["init"] == "simclr")
        & (runs["fraction"] == 0.5)
        & (runs["seed"] == 1)
        & (runs["metric"] == "auc")
    ].iloc[0]
    assert row["value"] == pytest.approx(0.7 + 0.1 + 0.01 + 0.05)
    assert row["n_train"] == 200
    assert row["best_epoch"] == 4
    assert row["task_type"] == "binary"


def test_sorted_by_task_metric_init_fraction_seed(sweep: list[Path]) -> None:
    runs = build_runs(reversed(sweep))
    keys = list(SORT_KEYS)
    assert runs[keys].equals(runs[keys].sort_values(keys).reset_index(drop=True))
    assert runs["metric"].iloc[0] == "accuracy"
    assert runs["init"].iloc[0] == "scratch"


def test_nan_metric_is_kept(tmp_path: Path) -> None:
    # An undefined metric is null in the file: medssl.core.files.write_json writes a NaN so.
    path = write_metrics(tmp_path, payload("scratch", "nodule", 0.1, 0, auc=None, accuracy=0.5))
    runs = build_runs([path])
    assert math.isnan(runs.loc[runs["metric"] == "auc", "value"].iloc[0])


def test_infinite_metric_names_file_and_key(tmp_path: Path) -> None:
    path = write_metrics(tmp_path, payload("scratch", "nodule", 0.1, 0, auc=math.inf, accuracy=0.5))
    with pytest.raises(MetricsError, match=r"metrics\.json.*test\.auc.*infinite"):
        build_runs([path])


@pytest.mark.parametrize("key", ["init", "fraction", "seed", "n_train", "best_epoch", "test"])
def test_missing_key_names_file_and_key(tmp_path: Path, key: str) -> None:
    run = payload("scratch", "nodule", 0.1, 0)
    path = write_metrics(tmp_path, run)
    del run[key]
    path.write_text(json.dumps(run))
    with pytest.raises(MetricsError) as err:
        build_runs([path])
    assert str(path) in str(err.value)
    assert repr(key) in str(err.value)


def test_bad_types_and_json_are_reported(tmp_path: Path) -> None:
    run = payload("scratch", "nodule", 0.1, 0)
    run["fraction"] = 1.5
    path = write_metrics(tmp_path, run)
    with pytest.raises(MetricsError, match="fraction"):
        build_runs([path])
    run = payload("scratch", "nodule", 0.1, 0, auc="high")
    path.write_text(json.dumps(run))
    with pytest.raises(MetricsError, match="test.auc"):
        build_runs([path])
    path.write_text("{not json")
    with pytest.raises(ValueError, match=str(path)):
        build_runs([path])


def test_duplicate_run_is_an_error(tmp_path: Path) -> None:
    first = write_metrics(tmp_path / "a", payload("scratch", "nodule", 0.1, 0))
    second = write_metrics(tmp_path / "b", payload("scratch", "nodule", 0.1, 0))
    with pytest.raises(MetricsError, match="duplicate run"):
        build_runs([first, second])


def test_a_file_of_several_seeds_gives_the_same_rows_as_one_file_per_seed(
    sweep: list[Path], tmp_path: Path
) -> None:
    """A job that ran several seeds (compute.seeds_per_job) writes a list of runs."""
    payloads = [json.loads(p.read_text()) for p in sweep]
    blocks = tmp_path / "blocks"
    blocks.mkdir()
    paths = []
    for index in range(0, len(payloads), 2):
        path = blocks / f"block{index}.json"
        path.write_text(json.dumps(payloads[index : index + 2]))
        paths.append(path)
    pd.testing.assert_frame_equal(build_runs(paths), build_runs(sweep))


def test_a_list_of_runs_is_checked_run_by_run(tmp_path: Path) -> None:
    good = payload("scratch", "nodule", 0.1, 0)
    bad = {k: v for k, v in payload("scratch", "nodule", 0.1, 1).items() if k != "seed"}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps([good, bad]))
    with pytest.raises(MetricsError, match=r"metrics\.json\[1\].*'seed'"):
        build_runs([path])
    path.write_text("[]")
    with pytest.raises(MetricsError, match="empty list"):
        build_runs([path])
    path.write_text(json.dumps([good, good]))
    with pytest.raises(MetricsError, match="duplicate run"):
        build_runs([path])


def test_pretrain_seed_and_flags_are_carried_and_absent_means_not_recorded(tmp_path: Path) -> None:
    new = payload("simclr", "nodule", 0.1, 0)
    new |= {"pretrain_seed": 2, "flags": ["single_class_predicted", "constant_prediction"]}
    old = payload("scratch", "nodule", 0.1, 0)
    runs = build_runs([write_metrics(tmp_path, new), write_metrics(tmp_path, old)])
    simclr = runs[runs["init"] == "simclr"].iloc[0]
    assert simclr["pretrain_seed"] == 2
    assert simclr["flags"] == "constant_prediction;single_class_predicted"
    scratch = runs[runs["init"] == "scratch"].iloc[0]
    assert pd.isna(scratch["pretrain_seed"]) and scratch["flags"] == ""


def test_bad_flags_name_the_file(tmp_path: Path) -> None:
    path = write_metrics(tmp_path, payload("a", "t", 0.1, 0) | {"flags": "constant_prediction"})
    with pytest.raises(MetricsError, match="key 'flags' must be a list"):
        build_runs([path])
    path = write_metrics(tmp_path, payload("b", "t", 0.1, 0) | {"pretrain_seed": 1.5})
    with pytest.raises(MetricsError, match="pretrain_seed"):
        build_runs([path])
