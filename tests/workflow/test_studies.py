"""The two study configs: valid, and their job graphs have the expected size.

Their data cannot ship, so every ``/path/to/`` placeholder is replaced by an
empty file or folder in a temporary directory (a dry run reads none of them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medssl.pipeline.config import load_schema, validate_config
from medssl.pipeline.plan import encoder_name, import_jobs, pretrain_jobs, supervised_jobs

REPO = Path(__file__).resolve().parents[2]
STUDIES = REPO / "workflow" / "studies"
PLACEHOLDER = "/path/to/"
FOLDER_KEYS = {"dicom_dir", "root", "path"}


def _fill(node: object, root: Path, key: str = "") -> object:
    """Every placeholder path becomes an empty file (or folder, for folder keys) under ``root``."""
    if isinstance(node, dict):
        return {k: _fill(v, root, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, root, key) for v in node]
    if isinstance(node, str) and node.startswith(PLACEHOLDER):
        target = root / node[len(PLACEHOLDER) :]
        if key in FOLDER_KEYS:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        return str(target)
    return node


def _job_counts(workdir: Path) -> dict[str, int]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
        + ["--dry-run", "--quiet", "rules", "--cores", "1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    counts = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.mark.parametrize("study", ["wolf2023", "taher2021", "foundation2026"])
def test_study_dry_run_lists_the_expected_jobs(study: str, tmp_path: Path) -> None:
    raw = yaml.safe_load((STUDIES / f"{study}.yaml").read_text())
    config = _fill(raw, tmp_path / "data")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    resolved = validate_config(yaml.safe_load((workdir / "config.yaml").read_text()))
    counts = _job_counts(workdir)
    init_tasks = {
        name: init.get("tasks") or list(resolved["tasks"])
        for name, init in resolved["inits"].items()
    }
    cells = sum(map(len, init_tasks.values())) * len(resolved["fractions"])
    n_finetunes = cells * len(resolved["seeds"])
    per_job = resolved["compute"]["seeds_per_job"]
    assert counts["finetune"] == cells * -(-len(resolved["seeds"]) // per_job)
    assert counts.get("import_init", 0) == len(import_jobs(resolved))
    runs = min(len(resolved["pretrain"]["seeds"]), len(resolved["seeds"]))  # pre-training runs
    assert counts.get("pretrain", 0) == len(pretrain_jobs(resolved)) * runs
    assert counts["convert"] == len(resolved["data"]["datasets"])
    encoders = {encoder_name(resolved, init) for init in resolved["inits"]} - {None}
    assert (
        len(encoders)
        == sum(counts.get(rule, 0) for rule in ("import_init", "supervised_init"))
        + counts.get("pretrain", 0) // runs
    )
    if study == "foundation2026":
        backbones = {init.get("backbone") for init in resolved["inits"].values()} - {None}
        assert {"resnet50", "convnext_tiny", "vit_small_patch14_dinov2"} <= backbones
        assert {"vit_base_patch14_dinov2", "vit_base_patch16_224"} <= backbones
        protocols = {
            {**resolved["finetune"], **init["finetune"]}["protocol"]
            for init in resolved["inits"].values()
        }
        assert protocols == {"full", "linear", "knn"}
        assert resolved["fractions"] == [0.01, 0.1, 1.0] and len(resolved["seeds"]) == 5
        assert counts["pretrain"] == 2  # SparK, two pre-training runs
        knn = [
            init for init in resolved["inits"].values() if init["finetune"].get("protocol") == "knn"
        ]
        assert len(knn) == 7 and all(len(init["tasks"]) == 4 for init in knn)
    elif study == "wolf2023":
        assert sorted(resolved["pretrain"]["methods"]) == ["byol", "moco_v2", "spark", "swav"]
        assert len(resolved["inits"]) == 5 and resolved["finetune"]["epochs"] == 70
    else:
        assert len(import_jobs(resolved)) == 16 and counts.get("pretrain", 0) == 0
        assert counts["supervised_init"] == len(supervised_jobs(resolved)) == 4
        assert len(resolved["seeds"]) == 10 and len(resolved["inits"]) == 21
        assert n_finetunes == 21 * 7 * 1 * 10
        assert per_job == 10 and counts["finetune"] == 21 * 7
        # Classification averages ten crops at test time; segmentation has its own recipe.
        for name, task in resolved["tasks"].items():
            if task["type"] == "segmentation":
                assert task["finetune"]["lr"] == 0.001 and "tta" not in task["finetune"]
            else:
                assert task["finetune"]["tta"] == "ten_crop", name
    sources = {spec["source"] for spec in resolved["data"]["datasets"].values()}
    assert "preset" in sources


def test_study_placeholders_are_only_roots_and_checkpoints() -> None:
    """Public datasets are read as released: a study names their root folders, the
    published checkpoints and (study A's private set) a DICOM folder with labels."""
    allowed = {"root", "checkpoint", "dicom_dir", "labels"}
    for path in STUDIES.glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        assert _placeholder_keys(raw) <= allowed, path.name


def _placeholder_keys(node: object, key: str = "") -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_placeholder_keys(v, k) for k, v in node.items()))
    if isinstance(node, list):
        return set().union(*(_placeholder_keys(v, key) for v in node))
    return {key} if isinstance(node, str) and node.startswith(PLACEHOLDER) else set()


def test_study_placeholders_are_marked() -> None:
    """Every user path is a visible placeholder, so nothing points at a real machine's files."""
    for path in STUDIES.glob("*.yaml"):
        for line in path.read_text().splitlines():
            if PLACEHOLDER in line.split("#")[0]:
                assert "PLACEHOLDER" in line, f"{path.name}: {line.strip()}"


def test_study_is_a_complete_config() -> None:
    """A study file is a whole config: run as its directory's config.yaml, nothing is inherited."""
    for path in STUDIES.glob("*.yaml"):
        keys = set(yaml.safe_load(path.read_text()))
        assert set(load_schema()["required"]) <= keys, path.name


def test_default_config_plans_spark_against_contrastive_methods(tmp_path: Path) -> None:
    """The built-in run asks the studies' question: SparK, two contrastive methods and
    scratch, on every task at three fractions and three seeds."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    resolved = validate_config(config)
    methods = set(resolved["pretrain"]["methods"])
    assert "spark" in methods and len(methods & {"simclr", "moco_v2", "byol", "swav"}) >= 2
    assert {"scratch", *methods} <= set(resolved["inits"])
    assert len(resolved["fractions"]) >= 3 and len(resolved["seeds"]) >= 3
    counts = _job_counts(tmp_path)
    assert counts["pretrain"] == len(methods) * len(resolved["pretrain"]["seeds"])
    per_job = resolved["compute"]["seeds_per_job"]
    init_tasks = {
        name: init.get("tasks") or list(resolved["tasks"])
        for name, init in resolved["inits"].items()
    }
    cells = sum(map(len, init_tasks.values())) * len(resolved["fractions"])
    assert counts["finetune"] == cells * -(-len(resolved["seeds"]) // per_job)
    assert counts["costs"] == 1
