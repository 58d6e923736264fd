"""pretraining.recipes: pool subsets, lazy pools, fingerprints, divergence, method settings,
settings fitted to the run and the warnings about parts a run leaves untrained."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medssl.core.registry import UnknownNameError
from medssl.datasets.hdf5 import SliceDataset
from medssl.pipeline.codedeps import code_digest
from medssl.pretraining import recipes as pretrain_module
from medssl.pretraining.loop import NonFiniteLossError
from medssl.pretraining.recipes import (
    PRETRAIN_DEFAULTS,
    check_schedule,
    fit_method_settings,
    plan_run,
    pretrain,
    run_fingerprint,
    split_method_settings,
)
from tests.pretraining.hdf5_pool import SETTINGS, make_h5

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    return make_h5(tmp_path / "pool.h5")


def test_max_samples_and_lars(pool: Path, tmp_path: Path, one_thread) -> None:
    """A seeded subset and the LARS optimiser; 16 of 32 slices at batch 8 is 2 steps per epoch."""
    settings = {**SETTINGS, "epochs": 1, "max_samples": 16, "optimizer": "lars", "lr": 0.3}
    info = pretrain("simclr", pool, settings, 0, tmp_path / "e.pt", tmp_path / "ck", "cpu")
    assert info["n_samples"] == 16 and math.isfinite(info["final_loss"])


def test_lazy_pool_with_workers_matches_in_memory(
    pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    """Reading slices lazily from HDF5 in 2 workers trains exactly like the in-memory pool."""
    settings = {**SETTINGS, "epochs": 1}
    memory = tmp_path / "memory.pt"
    pretrain("simclr", pool, settings, 0, memory, tmp_path / "ck_memory", "cpu", num_workers=2)
    monkeypatch.setattr(pretrain_module, "IN_MEMORY_LIMIT_BYTES", 0)
    assert isinstance(pretrain_module.image_pool(pool, np.arange(4)), SliceDataset)
    lazy = tmp_path / "lazy.pt"
    pretrain("simclr", pool, settings, 0, lazy, tmp_path / "ck_lazy", "cpu", num_workers=2)
    expected = torch.load(memory, weights_only=True)
    for key, tensor in torch.load(lazy, weights_only=True).items():
        assert torch.equal(tensor, expected[key]), key


def test_changed_settings_do_not_resume(pool: Path, tmp_path: Path, one_thread, caplog) -> None:
    checkpoints = tmp_path / "ck"
    pretrain("simclr", pool, {**SETTINGS, "epochs": 1}, 0, tmp_path / "a.pt", checkpoints, "cpu")
    changed = {**SETTINGS, "epochs": 1, "lr": 0.01}
    with caplog.at_level("WARNING"):
        info = pretrain("simclr", pool, changed, 0, tmp_path / "b.pt", checkpoints, "cpu")
    assert "different configuration" in caplog.text
    assert info["epochs"] == 1


def test_nan_loss_stops_without_encoder(
    pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    import medssl.pretraining.methods.simclr as simclr

    monkeypatch.setattr(simclr, "nt_xent", lambda z1, z2, t: (z1.sum() + z2.sum()) * float("nan"))
    out = tmp_path / "encoder.pt"
    with pytest.raises(NonFiniteLossError, match="loss became nan at epoch 1, step 1"):
        pretrain("simclr", pool, SETTINGS, 0, out, tmp_path / "ck", "cpu")
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_too_few_samples_for_a_batch(pool: Path, tmp_path: Path, one_thread) -> None:
    settings = {**SETTINGS, "max_samples": 4}
    with pytest.raises(ValueError, match="fewer than batch_size"):
        pretrain("simclr", pool, settings, 0, tmp_path / "e.pt", tmp_path / "ck", "cpu")


def test_method_optim_section_overrides_the_shared_keys() -> None:
    settings = {
        "lr": 0.1,
        "optimizer": "adamw",
        "spark": {"mask_ratio": 0.5, "optim": {"lr": 1e-3}},
    }
    method_settings, train = split_method_settings("spark", settings)
    assert method_settings == {"mask_ratio": 0.5}
    assert train["lr"] == 1e-3 and train["optimizer"] == "adamw"
    with pytest.raises(KeyError, match=r"unknown pretrain\.spark\.optim key 'epochs'"):
        split_method_settings("spark", {"spark": {"optim": {"epochs": 3}}})


def test_unknown_method_fails_before_any_work(pool: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'spark'"):
        pretrain("sparc", pool, SETTINGS, 0, tmp_path / "e.pt", tmp_path / "ck", "cpu")
    assert not (tmp_path / "ck").exists()


def test_fingerprint_holds_the_method_code(pool: Path) -> None:
    """A checkpoint is resumed only under the same stage code and the same method module."""
    indices = np.arange(4)
    simclr = run_fingerprint("simclr", SETTINGS, 0, pool, indices, None, 1)
    swav = run_fingerprint("swav", SETTINGS, 0, pool, indices, None, 1)
    assert simclr["code"] == code_digest("pretrain", "pretraining.methods.simclr")
    assert simclr["code"] != swav["code"] and "world_size" not in simclr
    assert run_fingerprint("simclr", SETTINGS, 0, pool, indices, None, 2)["world_size"] == 2


def test_schema_defaults_of_the_pretrain_keys_equal_the_code() -> None:
    """``pretrain`` keys this module defaults: the schema's default is the code's, key by key."""
    section = yaml.safe_load(SCHEMA.read_text())["properties"]["pretrain"]["properties"]
    for key, value in PRETRAIN_DEFAULTS.items():
        assert section[key]["default"] == value, key


def test_check_schedule_warns_of_a_warmup_as_long_as_the_run() -> None:
    """SimCLR's recipe warms up for 10 epochs; a 4-epoch run of 3 steps each never peaks."""
    trainer, plan = plan_run("simclr", {"epochs": 4, "batch_size": 8}, 24, 1)
    settings = fit_method_settings("simclr", {}, plan)
    (message,) = check_schedule("simclr", settings, trainer, plan)
    assert "warmup_epochs 10 is 30 steps, not shorter than the run's 12" in message
    assert "reaches 40 % of its peak" in message
    trainer, plan = plan_run("simclr", {"epochs": 4, "batch_size": 8, "warmup_epochs": 1}, 24, 1)
    assert check_schedule("simclr", settings, trainer, plan) == []


def test_check_schedule_adds_the_method_warnings() -> None:
    """SwAV's default freeze (one epoch) in a one-epoch run, beside the warm-up."""
    trainer, plan = plan_run("swav", {"epochs": 1, "batch_size": 8}, 32, 1)
    messages = check_schedule("swav", fit_method_settings("swav", {}, plan), trainer, plan)
    assert [m.split(" ")[0] for m in messages] == ["warmup_epochs", "swav.freeze_prototypes_epochs"]


def test_pretrain_fits_the_settings_to_the_run_and_logs_the_warnings(
    pool: Path, tmp_path: Path, one_thread, caplog: pytest.LogCaptureFixture
) -> None:
    """A 4-step BYOL run: the 40-epoch preset momentum, recorded in the sidecar, and warnings."""
    settings = {**SETTINGS, "epochs": 1, "byol": {"hidden_dim": 32, "proj_dim": 16}}
    with caplog.at_level("INFO"):
        info = pretrain("byol", pool, settings, 0, tmp_path / "e.pt", tmp_path / "ck", "cpu")
    assert info["method_settings"] == {"hidden_dim": 32, "proj_dim": 16, "base_momentum": 0.97}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith("byol: warmup_epochs 1 is 4 steps") for w in warnings), warnings
    assert any(w.startswith("byol: byol.base_momentum 0.97 over 4 steps") for w in warnings)
    assert "base_momentum 0.97, the official preset for 1 epochs" in caplog.text


def test_spark_from_random_weights_takes_its_backbone_recipe_and_an_encoder_start_does_not(
    tmp_path: Path,
) -> None:
    from medssl.models.backbones import save_encoder
    from medssl.pretraining.methods import method_class
    from medssl.pretraining.recipes import start_backbone

    recipe = method_class("spark").backbone_recipe
    settings = {"backbone": "resnet18"}
    fresh = start_backbone(settings, 1, None, recipe).backbone
    last_norms = [block.bn2.weight for layer in (fresh.layer1, fresh.layer4) for block in layer]
    assert all(torch.count_nonzero(weight) == 0 for weight in last_norms)
    plain = start_backbone(settings, 1, None, {}).backbone
    assert torch.count_nonzero(plain.layer1[0].bn2.weight) > 0
    # An encoder start keeps its weights; an explicit zero-init request cannot erase them.
    path = tmp_path / "encoder.pt"
    save_encoder(plain, path, "resnet18", {"method": "x"})
    options = {"backbone_options": {"zero_init_residual": True}}
    continued = start_backbone({**settings, **options}, 1, path, recipe).backbone
    assert torch.equal(continued.layer1[0].bn2.weight, plain.layer1[0].bn2.weight)
