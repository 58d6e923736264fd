"""The config is checked before any job starts, with messages naming the key."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medssl.pipeline.config import ConfigError, validate_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults(config: dict) -> None:
    resolved = validate_config(copy.deepcopy(config))
    assert resolved["data"]["datasets"]["synthct"]["labels_key"] == "sop_uid"
    assert resolved["pretrain"]["augment"]["flip"] is True
    assert resolved["tasks"]["nodule"]["split"]["val"] == 0.2


def _set(config: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()

MUTATIONS = [
    ("finetune.protocol", "ful", "finetune.protocol"),
    ("finetune.epochs", 0, "finetune.epochs"),
    ("finetune.lr", -1, "finetune.lr"),
    ("finetune.lr", "fast", "finetune.lr"),
    ("finetune.learning_rate", 0.1, "learning_rate"),
    ("fractions", [0.0, 0.5], "fractions.0"),
    ("fractions", [0.5, 1.5], "fractions.1"),
    ("fractions", [], "fractions"),
    ("seeds", [0, 0], "seeds"),
    ("seeds", [-1], "seeds.0"),
    ("pretrain.methods", ["simclrr"], "pretrain.methods.0"),
    ("pretrain.backbone", "vit", "pretrain.backbone"),
    ("pretrain.dataset", "missing", "pretrain.dataset"),
    ("tasks.nodule.type", "regression", "tasks.nodule.type"),
    ("tasks.nodule.dataset", "lidc", "tasks.nodule.dataset"),
    ("tasks.nodule.split", {"val": 0.5, "test": 0.5}, "tasks.nodule.split"),
    ("inits.simclr.method", "barlow_twins", "inits.simclr.method"),
    ("inits.scratch.source", "imagenet", "inits.scratch.source"),
    ("data.convert.intensity.policy", "clahe", "data.convert.intensity.policy"),
    ("data.convert.intensity.windows", [{"center": 40, "width": 0}], "windows.0.width"),
    ("data.datasets.synthct.source", "dicom", "synthct"),
    ("data.datasets.synthct.synthetic.patients", 2, "synthetic.patients"),
    ("stats.correction", "bonferroni", "stats.correction"),
    ("compute.device", "tpu", "compute.device"),
    ("finetune", _DELETE, "finetune"),
    ("tasks.nodule.finetune", {"tta": "twelve_crop"}, "tasks.nodule.finetune.tta"),
    ("tasks.nodule.finetune", {"learning_rate": 1}, "tasks.nodule.finetune: unknown key"),
    ("tasks.lung.finetune", {"tta": "ten_crop"}, "ten_crop is for classification"),
    ("data.datasets.synthct.convert", {"image_size": 8}, "synthct.convert.image_size"),
    ("data.datasets.synthct.convert", {"intensity": {"policy": "x"}}, "convert.intensity.policy"),
    ("data.datasets.synthct.convert", {"image_size": 80}, "multiple of 32"),
    ("tasks.nodule.split", {"source": "released"}, "tasks.nodule.split.source"),
    ("tasks.lung.masks", {"format": "rle", "structure": "lung"}, "reads a preset release"),
    ("pretrain.seeds", [], "pretrain.seeds"),
    ("pretrain.seed", 0, "unknown key(s) ['seed']"),
]


@pytest.mark.parametrize(("key", "value", "named"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_wrong_value_is_refused_naming_the_key(config: dict, key: str, value, named: str) -> None:
    _set(config, key, value)
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    assert named in str(caught.value)


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "resnet50.pth"
    path.write_bytes(b"")  # the config check looks for the file, it does not read it
    return path


INIT_MUTATIONS = [
    ({"source": "import", "format": "moco_v2"}, "inits.new"),  # no checkpoint
    ({"source": "import", "checkpoint": "CKPT", "format": "moco"}, "inits.new.format"),
    (
        {"source": "import", "checkpoint": "/nowhere/x.pth", "format": "swav"},
        "inits.new.checkpoint",
    ),
    (
        {"source": "import", "checkpoint": "CKPT", "format": "moco_v2", "backbone": "resnet18"},
        "inits.new.backbone",
    ),
    (
        {"source": "import", "checkpoint": "CKPT", "format": "dino", "stem": "mean"},
        "inits.new.stem",
    ),
    (
        {"source": "import", "checkpoint": "CKPT", "format": "dino", "method": "spark"},
        "inits.new.method",
    ),
    ({"source": "pretrain", "method": "spark", "from": "imagenet2"}, "inits.new.from"),
    ({"source": "pretrain", "method": "spark", "from": "scratch"}, "inits.new.from"),
    ({"source": "pretrain", "method": "spark", "from": "new"}, "inits.new.from"),
    ({"source": "pretrain", "method": "spork", "from": "imagenet"}, "inits.new.method"),
    ({"source": "pretrain", "checkpoint": "CKPT"}, "inits.new.checkpoint"),
    ({"source": "scratch", "from": "imagenet"}, "inits.new.from"),
    ({"source": "supervised"}, "inits.new"),  # no task
    ({"source": "supervised", "task": "no_such_task"}, "inits.new.task"),
    ({"source": "supervised", "task": "region", "from": "scratch"}, "inits.new.from"),
    ({"source": "supervised", "task": "region", "method": "simclr"}, "inits.new.method"),
]


@pytest.mark.parametrize(("init", "named"), INIT_MUTATIONS, ids=[m[1] for m in INIT_MUTATIONS])
def test_wrong_init_is_refused_naming_the_key(
    config: dict, checkpoint: Path, init: dict, named: str
) -> None:
    config["inits"]["imagenet"] = {
        "source": "import",
        "checkpoint": str(checkpoint),
        "format": "torchvision",
    }
    config["inits"]["new"] = {k: str(checkpoint) if v == "CKPT" else v for k, v in init.items()}
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    assert named in str(caught.value)


def test_continual_cycle_and_name_clash_are_refused(config: dict, checkpoint: Path) -> None:
    config["inits"]["a"] = {"source": "pretrain", "method": "simclr", "from": "b"}
    config["inits"]["b"] = {"source": "pretrain", "method": "simclr", "from": "a"}
    with pytest.raises(
        ConfigError, match=r"inits\.a\.from: continual pre-training loops: a -> b -> a"
    ):
        validate_config(copy.deepcopy(config))
    del config["inits"]["a"], config["inits"]["b"]
    config["inits"]["simclr"] = {
        "source": "import",
        "checkpoint": str(checkpoint),
        "format": "dino",
    }
    with pytest.raises(ConfigError, match=r"inits\.simclr: an import writes results/init/simclr/"):
        validate_config(config)


def test_dicom_dataset_needs_existing_folder(config: dict, tmp_path: Path) -> None:
    config["data"]["datasets"]["mine"] = {
        "source": "dicom",
        "dicom_dir": str(tmp_path / "nowhere"),
        "labels": str(tmp_path / "labels.csv"),
    }
    with pytest.raises(ConfigError, match="data.datasets.mine.dicom_dir"):
        validate_config(config)


@pytest.mark.parametrize(
    ("dataset", "named"),
    [
        ({"source": "images", "root": "nowhere", "manifest": "m.csv"}, "mine.root: folder"),
        ({"source": "npz", "path": "nowhere.npz"}, "mine.path: file"),
        ({"source": "preset", "preset": "drive", "root": "nowhere"}, "mine.root: folder"),
        ({"source": "preset", "preset": "drvie", "root": "."}, "choose one of"),
        ({"source": "images", "root": "."}, "'manifest' is a required property"),
    ],
)
def test_dataset_sources_need_their_files(config: dict, dataset: dict, named: str) -> None:
    config["data"]["datasets"]["mine"] = dataset
    with pytest.raises(ConfigError, match=re.escape(named)):
        validate_config(config)


def test_a_classification_task_on_a_dicom_folder_without_labels_is_refused(
    config: dict, tmp_path: Path
) -> None:
    config["data"]["datasets"]["mine"] = {"source": "dicom", "dicom_dir": str(tmp_path)}
    config["tasks"]["mine_nodule"] = {"dataset": "mine", "type": "binary", "column": "nodule"}
    with pytest.raises(ConfigError, match="data.datasets.mine.labels is not set"):
        validate_config(config)
    del config["tasks"]["mine_nodule"]
    validate_config(config)  # a pre-training pool needs no labels


def test_snakemake_refuses_bad_config_before_any_job(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"finetune": {"protocol": "ful"}}))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--dry-run", "--configfile", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "finetune.protocol" in result.stdout + result.stderr


def test_schema_names_match_the_registries() -> None:
    """The schema lists methods and backbones so parsing never imports torch."""
    from medssl.models import backbones
    from medssl.pipeline.config import backbone_names, method_names
    from medssl.pretraining.methods import METHODS

    assert sorted(method_names()) == sorted(METHODS)
    assert sorted(backbone_names()) == sorted(backbones.backbone_names())
