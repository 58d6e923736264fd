"""metrics.json -> runs.csv: rows, strict validation and byte-identical output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from medssl.analysis import runs as aggregate
from medssl.analysis.runs import COLUMNS, MetricsError, build_runs, main


def _payload(init: str, task: str, fraction: float, seed: int, **test: float) -> dict:
    return {
        "init": init,
        "task": task,
        "task_type": "binary",
        "fraction": fraction,
        "seed": seed,
        "n_train": int(400 * fraction),
        "n_val": 60,
        "n_test": 60,
        "best_epoch": 3 + seed,
        "val": {"auc": 0.5, "accuracy": 0.5},
        "test": test or {"auc": 0.8, "accuracy": 0.7, "f1": 0.6},
        "history": [{"epoch": 1, "train_loss": 0.6, "val_auc": 0.7}],
        "settings": {},
        "provenance": {},
    }


def _write(root: Path, payload: dict) -> Path:
    path = (
        root
        / payload["init"]
        / payload["task"]
        / f"frac{payload['fraction']}"
        / f"seed{payload['seed']}"
        / "metrics.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Plain json.dumps: a test may write what medssl.core.files.write_json never would (NaN).
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> list[Path]:
    root = tmp_path / "finetune"
    paths = []
    for init in ("simclr", "scratch"):
        for fraction in (0.5, 0.1):
            for seed in (1, 0):
                score = 0.7 + 0.1 * (init == "simclr") + 0.01 * seed + 0.1 * fraction
                paths.append(
                    _write(
                        root,
                        _payload(init, "nodule", fraction, seed, auc=score, accuracy=score - 0.1),
                    )
                )
    return paths


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
    keys = list(aggregate.SORT_KEYS)
    assert runs[keys].equals(runs[keys].sort_values(keys).reset_index(drop=True))
    assert runs["metric"].iloc[0] == "accuracy"
    assert runs["init"].iloc[0] == "scratch"


def test_cli_is_byte_identical_whatever_the_input_order(sweep: list[Path], tmp_path: Path) -> None:
    out1, out2 = tmp_path / "a" / "runs.csv", tmp_path / "b" / "runs.csv"
    assert main(["--out", str(out1), *map(str, sweep)]) == 0
    listfile = tmp_path / "list.txt"
    listfile.write_text("\n".join(map(str, reversed(sweep))) + "\n")
    assert main(["--out", str(out2), f"@{listfile}"]) == 0
    assert out1.read_bytes() == out2.read_bytes()
    text = out1.read_text().splitlines()
    assert text[0] == ",".join(COLUMNS)
    # Integers stay integers in the CSV.
    assert text[1].split(",")[-2:] == ["40", "3"]
    assert (tmp_path / "a" / "runs.csv.provenance.json").is_file()


def test_partial_mode_globs_the_root(sweep: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "partial.csv"
    assert main(["--partial", "--root", str(tmp_path / "finetune"), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 16


def test_nan_metric_is_kept(tmp_path: Path) -> None:
    # An undefined metric is null in the file: medssl.core.files.write_json writes a NaN so.
    path = _write(tmp_path, _payload("scratch", "nodule", 0.1, 0, auc=None, accuracy=0.5))
    runs = build_runs([path])
    assert math.isnan(runs.loc[runs["metric"] == "auc", "value"].iloc[0])
    out = tmp_path / "runs.csv"
    assert main(["--out", str(out), str(path)]) == 0
    assert pd.read_csv(out)["value"].isna().sum() == 1


def test_infinite_metric_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, _payload("scratch", "nodule", 0.1, 0, auc=math.inf, accuracy=0.5))
    with pytest.raises(MetricsError, match=r"metrics\.json.*test\.auc.*infinite"):
        build_runs([path])


@pytest.mark.parametrize("key", ["init", "fraction", "seed", "n_train", "best_epoch", "test"])
def test_missing_key_names_file_and_key(tmp_path: Path, key: str) -> None:
    payload = _payload("scratch", "nodule", 0.1, 0)
    path = _write(tmp_path, payload)
    del payload[key]
    path.write_text(json.dumps(payload))
    with pytest.raises(MetricsError) as err:
        build_runs([path])
    assert str(path) in str(err.value)
    assert repr(key) in str(err.value)


def test_bad_types_and_json_are_reported(tmp_path: Path) -> None:
    payload = _payload("scratch", "nodule", 0.1, 0)
    payload["fraction"] = 1.5
    path = _write(tmp_path, payload)
    with pytest.raises(MetricsError, match="fraction"):
        build_runs([path])
    payload = _payload("scratch", "nodule", 0.1, 0, auc="high")
    path.write_text(json.dumps(payload))
    with pytest.raises(MetricsError, match="test.auc"):
        build_runs([path])
    path.write_text("{not json")
    with pytest.raises(ValueError, match=str(path)):
        build_runs([path])


def test_cli_reports_bad_file_and_writes_nothing(tmp_path: Path, caplog) -> None:
    good = _write(tmp_path, _payload("scratch", "nodule", 0.1, 0))
    bad = _write(tmp_path, _payload("simclr", "nodule", 0.1, 0, auc=-math.inf))
    out = tmp_path / "runs.csv"
    assert main(["--out", str(out), str(good), str(bad)]) == 1
    assert not out.exists()
    assert str(bad) in caplog.text


def test_duplicate_run_is_an_error(tmp_path: Path) -> None:
    first = _write(tmp_path / "a", _payload("scratch", "nodule", 0.1, 0))
    second = _write(tmp_path / "b", _payload("scratch", "nodule", 0.1, 0))
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
    good = _payload("scratch", "nodule", 0.1, 0)
    bad = {k: v for k, v in _payload("scratch", "nodule", 0.1, 1).items() if k != "seed"}
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
