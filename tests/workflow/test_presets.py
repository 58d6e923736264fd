"""Every dataset preset, on a miniature replica of its release, through the workflow:
conversion, masks, the (official) split and one fine-tune each; then a changed
per-task or per-dataset setting reruns that task's or dataset's jobs only."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medssl.datasets.hdf5 import read_meta
from tests.datasets import replicas
from tests.workflow.tree import copy_workflow, planned_jobs, snakemake

TASKS = {
    "cxr14": {
        "dataset": "cxr14",
        "type": "multilabel",
        "columns": ["Effusion", "Mass"],
        "split": {"source": "official", "val": 0.2},
    },
    "chexpert": {
        "dataset": "chexpert",
        "type": "multilabel",
        "columns": ["Cardiomegaly", "Edema"],
        "split": {"source": "official", "test": 0.2},
    },
    "shenzhen": {"dataset": "shenzhen", "type": "binary", "column": "tuberculosis"},
    "montgomery": {
        "dataset": "montgomery",
        "type": "segmentation",
        "masks": {"format": "preset", "structure": "lung"},
    },
    "drive": {
        "dataset": "drive",
        "type": "segmentation",
        "masks": {"format": "preset", "structure": "vessel"},
        "split": {"source": "official", "val": 0.25},
    },
    "siim": {
        "dataset": "siim",
        "type": "segmentation",
        "masks": {"format": "rle", "structure": "pneumothorax"},
    },
    "rsna_pe": {"dataset": "rsna_pe", "type": "binary", "column": "pe_present_on_image"},
    "covid_ct": {
        "dataset": "covid_ct",
        "type": "binary",
        "column": "covid",
        "split": {"source": "official"},
    },
    "organs": {
        "dataset": "organs",
        "type": "multiclass",
        "column": "label",
        "split": {"source": "official"},
    },
}

PRESET_OF = {
    "cxr14": "chestxray14",
    "chexpert": "chexpert",
    "shenzhen": "shenzhen",
    "montgomery": "montgomery",
    "drive": "drive",
    "siim": "siim",
    "rsna_pe": "rsna_pe",
    "covid_ct": "covid_ct",
    "organs": "organsmnist",
    "lidc": "lidc",
}


def preset_config(data: Path) -> dict:
    datasets = {
        name: {"source": "preset", "preset": preset, "root": str(data / preset)}
        for name, preset in PRESET_OF.items()
    }
    datasets["drive"]["convert"] = {"image_size": 64}
    # Study B's policy: uncertain labels become soft targets, left out of the metrics.
    datasets["chexpert"]["preset_options"] = {"uncertainty": "lsr_ones"}
    return {
        "data": {"datasets": datasets, "convert": {"image_size": 32}},
        "tasks": TASKS,
        "pretrain": {"dataset": "lidc", "methods": []},
        "inits": {"scratch": {"source": "scratch"}},
        "finetune": {"epochs": 1, "batch_size": 16, "decoder_channels": [32, 16, 8, 8, 8]},
        "fractions": [1.0],
        "seeds": [0],
        "stats": {},
        "compute": {
            "device": "cpu",
            "threads": {"synthesize": 1, "convert": 1, "pretrain": 1, "finetune": 1},
        },
    }


def write_config(workdir: Path, config: dict) -> None:
    text = yaml.safe_dump(config, sort_keys=False)
    (workdir / "config.yaml").write_text(text)
    (workdir / "presets.yaml").write_text(text)


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("presets")
    facts = {name: write(root / "data" / name) for name, write in replicas.WRITERS.items()}
    workdir = copy_workflow(root / "run")
    config = preset_config(root / "data")
    write_config(workdir, config)
    snakemake(
        workdir, "results/tables/runs.csv", "results/data/lidc.h5", configfiles=("presets.yaml",)
    )
    return workdir, {"facts": facts, "config": config}


def test_every_preset_converts_splits_and_fine_tunes(preset_run: tuple[Path, dict]) -> None:
    workdir, _ = preset_run
    runs = pd.read_csv(workdir / "results" / "tables" / "runs.csv")
    assert set(runs["task"]) == set(TASKS)
    for name in PRESET_OF:
        rejects = pd.read_csv(workdir / "results" / "data" / f"{name}.rejects.csv")
        assert rejects["reason"].notna().all(), name
    assert (workdir / "results" / "data" / "lidc.h5").is_file()


def test_uncertain_chexpert_labels_train_as_soft_targets_and_are_not_scored(
    preset_run: tuple[Path, dict],
) -> None:
    workdir, _ = preset_run
    partition = pd.read_csv(workdir / "results" / "splits" / "chexpert.csv")
    values = partition["targets"].str.split(";", expand=True).astype(float).to_numpy()
    soft = (values > 0) & (values < 1)
    assert soft.any() and ((values[soft] >= 0.55) & (values[soft] <= 0.85)).all()
    assert not soft[partition["split"].to_numpy() == "val"].any()  # valid.csv is certain
    files = sorted((workdir / "results/finetune/scratch/chexpert").rglob("metrics.json"))
    loaded = [json.loads(path.read_text()) for path in files]
    records = [r for item in loaded for r in (item if isinstance(item, list) else [item])]
    assert records
    test_soft = int(soft[partition["split"].to_numpy() == "test"].sum())
    assert all(record["test_excluded_entries"] == test_soft for record in records)


def test_labels_tables_are_keyed_by_image_and_rejects_name_their_reason(
    preset_run: tuple[Path, dict],
) -> None:
    workdir, _ = preset_run
    data = workdir / "results" / "data"
    cxr = pd.read_csv(data / "cxr14.labels.csv", dtype={"patient_id": str})
    assert {"sop_uid", "patient_id", "official_split", "Effusion", "Hernia"} <= set(cxr)
    assert set(cxr["official_split"]) == {"train", "test"}
    rejects = pd.read_csv(data / "chexpert.rejects.csv")
    assert rejects["reason"].str.contains("no image file").any()
    # RSNA-PE's PatientID is anonymised alike: each study is its own patient.
    partition = pd.read_csv(workdir / "results" / "splits" / "rsna_pe.csv", dtype=str)
    assert partition["patient_id"].nunique() > 3


def test_official_splits_keep_the_released_test_set(preset_run: tuple[Path, dict]) -> None:
    workdir, _ = preset_run
    labels = pd.read_csv(workdir / "results" / "data" / "covid_ct.labels.csv", dtype=str)
    meta = read_meta(workdir / "results" / "data" / "covid_ct.h5")
    partition = pd.read_csv(workdir / "results" / "splits" / "covid_ct.csv")
    released = set(labels.loc[labels["official_split"] == "test", "sop_uid"])
    tested = set(meta.loc[partition.loc[partition["split"] == "test", "index"], "sop_uid"])
    assert tested == released
    organs = pd.read_csv(workdir / "results" / "splits" / "organs.csv", dtype=str)
    assert set(organs["split"]) == {"train", "val", "test"}


def test_a_tasks_or_datasets_own_settings_rerun_only_its_jobs(
    preset_run: tuple[Path, dict],
) -> None:
    workdir, run = preset_run
    config = yaml.safe_load(yaml.safe_dump(run["config"]))
    config["tasks"]["shenzhen"]["finetune"] = {"epochs": 2}
    write_config(workdir, config)
    dry = snakemake(workdir, "-n", "results/tables/runs.csv", configfiles=("presets.yaml",))
    assert planned_jobs(dry) == {"finetune": 1, "aggregate": 1}
    config["data"]["datasets"]["montgomery"]["convert"] = {"image_size": 64}
    write_config(workdir, config)
    dry = snakemake(workdir, "-n", "results/tables/runs.csv", configfiles=("presets.yaml",))
    jobs = planned_jobs(dry)
    assert jobs.pop("finetune") == 2  # shenzhen (still changed) and montgomery
    assert jobs == {"convert": 1, "masks": 1, "split": 1, "subsample": 1, "aggregate": 1}
    write_config(workdir, run["config"])
