"""The workflow's settings policy, without running Snakemake: jobs, inputs and settings."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from medssl.pipeline.config import ConfigError, method_names, validate_config
from medssl.pipeline.plan import (
    WorkflowPlan,
    encoder_name,
    fraction_label,
    import_jobs,
    pretrain_jobs,
    seed_block_label,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def config() -> dict:
    """The default config cut to scratch and one pre-trained init, so a test that sets
    its own methods or inits starts from a known grid."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["inits"] = {name: config["inits"][name] for name in ("scratch", "simclr")}
    config["pretrain"]["methods"] = ["simclr"]
    return validate_config(config)


def plan(config: dict) -> WorkflowPlan:
    return WorkflowPlan(config, method_names())


def revalidated(config: dict, **sections: object) -> dict:
    """A copy of ``config`` with top-level ``sections`` replaced, validated again."""
    changed = copy.deepcopy(config)
    changed.update(copy.deepcopy(sections))
    return validate_config(changed)


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "resnet50.pth"
    path.write_bytes(b"")
    return path


def test_path_labels() -> None:
    assert [fraction_label(f) for f in (0.1, 0.25, 1.0, "0.5")] == ["0.1", "0.25", "1", "0.5"]
    assert seed_block_label(["3"]) == "seed3"
    assert seed_block_label(["0", "1", "2"]) == "seeds0_1_2"


def test_seed_blocks_leave_existing_blocks_alone_when_seeds_are_appended(config: dict) -> None:
    compute = {**config["compute"], "seeds_per_job": 2}
    three = plan(revalidated(config, seeds=[0, 1, 2], compute=compute))
    assert three.seed_blocks == {"seeds0_1": ["0", "1"], "seed2": ["2"]}
    five = plan(revalidated(config, seeds=[0, 1, 2, 3, 4], compute=compute))
    assert list(five.seed_blocks) == ["seeds0_1", "seeds2_3", "seed4"]
    assert five.run_subsets("nodule", "seeds2_3") == [
        "results/splits/nodule/seed2.csv",
        "results/splits/nodule/seed3.csv",
    ]
    assert five.run_seeds("seeds2_3") == "2 3"


def test_pretrain_settings_hold_the_shared_keys_and_the_own_method_only(config: dict) -> None:
    pretrain = {**config["pretrain"], "methods": ["simclr", "byol"]}
    settings = json.loads(plan(revalidated(config, pretrain=pretrain)).pretrain_settings("simclr"))
    assert "simclr" in settings and "byol" not in settings
    assert not {"methods", "dataset", "seeds"} & set(settings)
    assert settings["epochs"] == config["pretrain"]["epochs"]


def test_adding_a_method_leaves_the_first_methods_settings_and_code_alone(config: dict) -> None:
    one = plan(config)
    two = plan(revalidated(config, pretrain={**config["pretrain"], "methods": ["simclr", "swav"]}))
    assert one.pretrain_settings("simclr") == two.pretrain_settings("simclr")
    assert one.pretrain_code_version("simclr") == two.pretrain_code_version("simclr")
    assert two.pretrain_code_version("simclr") != two.pretrain_code_version("swav")


def test_task_inputs_follow_the_task_type_and_the_dataset_source(
    config: dict, tmp_path: Path
) -> None:
    synthetic = plan(config)
    assert synthetic.task_labels("nodule") == "results/dicom/synthct.labels.csv"
    assert synthetic.task_labels("lung") == "results/masks/lung.h5"
    assert synthetic.task_masks("lung") == ["results/masks/lung.h5"]
    assert synthetic.task_masks("nodule") == []
    assert synthetic.mask_source("lung") == "results/dicom/synthct.masks"
    assert synthetic.mask_dicom_folder("lung") == "results/dicom/synthct"
    with pytest.raises(ValueError, match="'nodule' is not a segmentation task"):
        synthetic.mask_source("nodule")

    (tmp_path / "dicom").mkdir()
    (tmp_path / "labels.csv").write_text("sop_uid,x\n")
    datasets = {
        "synthct": {
            "source": "dicom",
            "dicom_dir": str(tmp_path / "dicom"),
            "labels": str(tmp_path / "labels.csv"),
        }
    }
    (tmp_path / "seg").mkdir()
    tasks = copy.deepcopy(config["tasks"])
    tasks["lung"]["masks"]["path"] = str(tmp_path / "seg")
    own = plan(revalidated(config, data={**config["data"], "datasets": datasets}, tasks=tasks))
    assert own.dicom_folder("synthct") == str(tmp_path / "dicom")
    assert own.task_labels("nodule") == str(tmp_path / "labels.csv")
    assert own.mask_source("lung") == str(tmp_path / "seg")
    assert own.mask_dicom_folder("lung") == str(tmp_path / "dicom")


def test_task_settings_carry_the_name_and_the_datasets_label_key(config: dict) -> None:
    settings = json.loads(plan(config).task_settings("region"))
    assert settings["name"] == "region"
    assert settings["labels_key"] == "sop_uid"
    assert settings["type"] == config["tasks"]["region"]["type"]


def test_import_and_continual_inits_resolve(config: dict, checkpoint: Path) -> None:
    inits = {
        **config["inits"],
        "imagenet": {"source": "import", "checkpoint": str(checkpoint), "format": "torchvision"},
        "imagenet_spark": {"source": "pretrain", "method": "spark", "from": "imagenet"},
    }
    resolved = revalidated(config, inits=inits)
    assert resolved["inits"]["imagenet"]["stem"] == "repeat"
    assert resolved["inits"]["imagenet"]["backbone"] == "resnet50"
    assert "stem" not in resolved["inits"]["imagenet_spark"]
    names = {init: encoder_name(resolved, init) for init in resolved["inits"]}
    assert names == {
        "scratch": None,
        "simclr": "simclr",
        "imagenet": "imagenet",
        "imagenet_spark": "imagenet_spark",
    }
    assert import_jobs(resolved) == ["imagenet"]
    assert pretrain_jobs(resolved) == {
        "simclr": {"method": "simclr", "from": None},
        "imagenet_spark": {"method": "spark", "from": "imagenet"},
    }
    jobs = plan(resolved)
    assert jobs.pretrain_start("imagenet_spark", "0") == ["results/init/imagenet/encoder.pt"]
    assert jobs.pretrain_start("simclr", "0") == []
    assert jobs.pretrain_method("imagenet_spark") == "spark"
    run = next(iter(jobs.seed_blocks))
    assert jobs.init_encoders("scratch", run) == []
    assert jobs.init_encoders("imagenet", run) == ["results/init/imagenet/encoder.pt"]
    assert jobs.init_encoder_files("imagenet_spark", run) == [
        "results/init/imagenet_spark/pseed0/encoder.pt"
    ]
    assert jobs.import_settings("imagenet") == {
        "format": "torchvision",
        "backbone": "resnet50",
        "stem": "repeat",
        "in_channels": 1,
        "img_size_option": "",
    }


def test_supervised_init_trains_on_its_task_and_seed(config: dict) -> None:
    inits = {**config["inits"], "cxr": {"source": "supervised", "task": "nodule", "seed": 3}}
    jobs = plan(revalidated(config, inits=inits))
    assert jobs.supervised == ["cxr"]
    assert jobs.supervised_task("cxr").seed == "3"
    assert jobs.supervised_subsets("cxr") == "results/splits/nodule/seed3.csv"
    assert jobs.supervised_start("cxr") == []


def test_final_outputs_cover_every_task_fraction_and_dataset(config: dict) -> None:
    jobs = plan(config)
    outputs = jobs.final_outputs()
    for task in jobs.tasks:
        assert f"results/tables/summary_{task}.tex" in outputs
        assert f"results/figures/bars_{task}.png" in outputs
    for fraction in jobs.fractions:
        assert f"results/figures/heatmap_frac{fraction}.png" in outputs
    assert "results/data/synthct.rejects.csv" in outputs
    n_runs = len(jobs.inits) * len(jobs.tasks) * len(jobs.fractions) * len(jobs.seed_blocks)
    assert len(set(jobs.finetune_metrics())) == n_runs


def test_fine_tune_seeds_are_spread_over_the_pre_training_runs(config: dict) -> None:
    pretrain = {**config["pretrain"], "seeds": [0, 7]}
    compute = {**config["compute"], "seeds_per_job": 2}
    jobs = plan(revalidated(config, pretrain=pretrain, seeds=[0, 1, 2, 3, 4], compute=compute))
    assert [jobs.pretrain_seed_of(s) for s in jobs.seeds] == ["0", "7", "0", "7", "0"]
    assert jobs.init_encoders("simclr", "seeds0_1") == [
        "results/init/simclr/pseed0/encoder.pt",
        "results/init/simclr/pseed7/encoder.pt",
    ]
    assert jobs.init_encoder_files("simclr", "seed4") == ["results/init/simclr/pseed0/encoder.pt"]
    benchmarks = jobs.training_benchmarks()
    assert "benchmarks/pretrain/simclr/pseed7.tsv" in benchmarks
    one_seed = plan(revalidated(config, pretrain=pretrain, seeds=[0]))
    assert "benchmarks/pretrain/simclr/pseed7.tsv" not in one_seed.training_benchmarks()
    # A second pre-training run changes no settings of the first one.
    assert jobs.pretrain_settings("simclr") == plan(config).pretrain_settings("simclr")


def test_a_tasks_finetune_keys_reach_its_fine_tunes_only(config: dict) -> None:
    tasks = copy.deepcopy(config["tasks"])
    tasks["nodule"]["finetune"] = {"tta": "flip", "epochs": 3}
    before, after = plan(config), plan(revalidated(config, tasks=tasks))
    changed = json.loads(after.finetune_settings("nodule"))
    assert changed["tta"] == "flip" and changed["epochs"] == 3
    assert changed["lr"] == config["finetune"]["lr"]
    assert after.finetune_settings("lung") == before.finetune_settings("lung")
    # The split reads the task's own keys, not its fine-tune recipe.
    assert after.task_settings("nodule") == before.task_settings("nodule")


def test_an_inits_finetune_keys_win_over_the_tasks_for_its_fine_tunes_only(config: dict) -> None:
    tasks, inits = copy.deepcopy(config["tasks"]), copy.deepcopy(config["inits"])
    tasks["nodule"]["finetune"] = {"protocol": "full", "epochs": 3}
    inits["scratch"]["finetune"] = {"protocol": "linear"}
    after = plan(revalidated(config, tasks=tasks, inits=inits))
    mine = json.loads(after.finetune_settings("nodule", "scratch"))
    assert mine["protocol"] == "linear" and mine["epochs"] == 3
    other = next(name for name in inits if name != "scratch")
    assert json.loads(after.finetune_settings("nodule", other))["protocol"] == "full"
    bad = copy.deepcopy(inits)
    bad["scratch"]["finetune"] = {"protocl": "linear"}
    with pytest.raises(
        ConfigError, match=r"inits\.scratch\.finetune: unknown key\(s\) \['protocl'\]"
    ):
        revalidated(config, inits=bad)


def test_an_init_with_its_own_tasks_is_fine_tuned_on_those_only(config: dict) -> None:
    inits = copy.deepcopy(config["inits"])
    inits["scratch"].update(tasks=["nodule"], finetune={"protocol": "knn"})
    jobs = plan(revalidated(config, inits=inits))
    assert jobs.init_tasks("scratch") == ["nodule"]
    scratch = [p for p in jobs.finetune_metrics() if p.startswith("results/finetune/scratch/")]
    assert scratch and all("/nodule/" in p for p in scratch)
    assert any("/lung/" in p for p in jobs.finetune_metrics())
    inits["scratch"]["tasks"] = ["nodule", "lung"]  # knn cannot segment
    with pytest.raises(ConfigError, match=r"inits\.scratch on task 'lung': protocol knn"):
        revalidated(config, inits=inits)
    inits["scratch"]["tasks"] = ["nodul"]
    with pytest.raises(ConfigError, match=r"inits\.scratch\.tasks: 'nodul' is not a task"):
        revalidated(config, inits=inits)


def test_a_datasets_convert_keys_replace_the_shared_ones_for_it_only(
    config: dict, tmp_path: Path
) -> None:
    (tmp_path / "dicom").mkdir()
    datasets = {
        **config["data"]["datasets"],
        "other": {
            "source": "dicom",
            "dicom_dir": str(tmp_path / "dicom"),
            "convert": {"image_size": 96},
        },
    }
    jobs = plan(revalidated(config, data={**config["data"], "datasets": datasets}))
    assert json.loads(jobs.convert_settings("other"))["image_size"] == 96
    assert json.loads(jobs.convert_settings("synthct"))["image_size"] == 64
    assert jobs.convert_settings("synthct") == plan(config).convert_settings("synthct")


def test_converted_sources_read_the_label_table_the_conversion_writes(
    config: dict, tmp_path: Path
) -> None:
    (tmp_path / "cxr").mkdir()
    (tmp_path / "manifest.csv").write_text("file,patient_id,finding\n")
    (tmp_path / "montgomery").mkdir()
    datasets = {
        **config["data"]["datasets"],
        "xray": {
            "source": "images",
            "root": str(tmp_path / "cxr"),
            "manifest": str(tmp_path / "manifest.csv"),
        },
        "mc": {"source": "preset", "preset": "montgomery", "root": str(tmp_path / "montgomery")},
    }
    tasks = {
        **config["tasks"],
        "finding": {"dataset": "xray", "type": "binary", "column": "finding"},
        "mc_lung": {
            "dataset": "mc",
            "type": "segmentation",
            "masks": {"format": "preset", "structure": "lung"},
        },
    }
    jobs = plan(revalidated(config, data={**config["data"], "datasets": datasets}, tasks=tasks))
    assert jobs.task_labels("finding") == "results/data/xray.labels.csv"
    assert json.loads(jobs.task_settings("finding"))["labels_key"] == "sop_uid"
    assert jobs.convert_source("xray") == str(tmp_path / "cxr")
    assert jobs.convert_manifest("xray") == [str(tmp_path / "manifest.csv")]
    assert jobs.convert_source_options("xray") == "--source images"
    assert jobs.convert_source_options("mc").startswith("--preset montgomery --preset-options ")
    assert jobs.mask_source("mc_lung") == str(tmp_path / "montgomery")
    assert jobs.mask_preset_option("mc_lung") == "--preset montgomery"
    assert jobs.mask_preset_option("lung") == ""
