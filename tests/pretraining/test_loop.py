"""pretraining.loop: trainer settings, schedules, per-rank data order and exact resumption."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from medssl.core.registry import UnknownNameError
from medssl.models import backbones as models
from medssl.pretraining import loop as trainer
from medssl.pretraining import optimizers
from medssl.pretraining.augment import MultiViewDataset
from medssl.pretraining.loop import TRAINER_DEFAULTS, plan_steps, train, warmup_cosine
from medssl.pretraining.methods import build_method
from tests.pretraining.methods.small_methods import ct_slices, make

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
SCHEMA_PRETRAIN_DEFAULTS = {
    key: spec["default"]
    for key, spec in yaml.safe_load(SCHEMA.read_text())["properties"]["pretrain"][
        "properties"
    ].items()
    if "default" in spec
}
"""Defaults of the config schema's ``pretrain`` keys (the optimiser keys have none on purpose)."""

"""Trainer keys whose schema default (5, 64, 1) differs from TRAINER_DEFAULTS (100, 256, 10)."""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def slices() -> torch.Tensor:
    return ct_slices()


def test_settings_override_the_recipe_and_null_counts() -> None:
    recipe = {"optimizer": "lamb", "lr": 2e-4, "grad_clip": 5.0, "weight_decay_end": 0.2}
    config = trainer.train_settings({"lr": 0.01, "grad_clip": None}, recipe)
    assert config["optimizer"] == "lamb" and config["lr"] == 0.01
    assert config["grad_clip"] is None and config["weight_decay_end"] == 0.2
    assert trainer.train_settings({})["optimizer"] == trainer.TRAINER_DEFAULTS["optimizer"]
    with pytest.raises(KeyError, match="unknown trainer key in a method's recipe 'learning_rate'"):
        trainer.train_settings({}, {"learning_rate": 1.0})


def test_cosine_ends_at_the_final_fraction() -> None:
    factor = trainer.warmup_cosine(warmup_steps=2, total_steps=10, final_fraction=0.001)
    assert factor(0) == 0.5 and factor(1) == 1.0
    assert factor(2) == pytest.approx(1.0)
    assert factor(6) == pytest.approx(0.001 + 0.999 * 0.5)
    assert factor(10) == pytest.approx(0.001)


def test_spark_weight_decay_rises_by_a_cosine() -> None:
    values = [trainer.weight_decay_at(step, 11, 0.04, 0.2) for step in range(11)]
    assert values[0] == pytest.approx(0.04) and values[-1] == pytest.approx(0.2)
    assert values[5] == pytest.approx(0.2 + (0.04 - 0.2) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert trainer.weight_decay_at(7, 11, 0.04, None) == 0.04
    groups = [
        {"params": [torch.nn.Parameter(torch.ones(2, 2))], "lars_exclude": False},
        {"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.0, "lars_exclude": True},
    ]
    optimizer = optimizers.build("lamb", groups, 1e-3, {"weight_decay": 0.04})
    trainer.set_weight_decay(optimizer, 0.1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_share_each_global_batch_in_order(world: int) -> None:
    single = trainer.epoch_order(37, 8, seed=3, epoch=2)
    assert len(single) == 32 and len(set(single)) == 32
    shares = [trainer.epoch_order(37, 8, 3, 2, rank, world) for rank in range(world)]
    local = 8 // world
    for step in range(4):
        rebuilt = [i for share in shares for i in share[step * local : (step + 1) * local]]
        assert rebuilt == single[step * 8 : (step + 1) * 8]
    assert trainer.epoch_order(37, 8, 3, 3) != single


def test_warmup_cosine_schedule() -> None:
    factor = warmup_cosine(warmup_steps=4, total_steps=12)
    assert [factor(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(8) == pytest.approx(0.5)
    assert factor(12) == pytest.approx(0.0)
    assert warmup_cosine(0, 10)(0) == 1.0


def test_unknown_optimizer_is_rejected() -> None:
    method = build_method("simclr", models.build_backbone("resnet_small", 1), {})
    with pytest.raises(ValueError, match="unknown optimizer"):
        trainer.build_optimizer(method, trainer.train_settings({"optimizer": "adagrad"}))


class Interrupted(RuntimeError):
    """Stands in for a job killed right after its first checkpoint."""


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("byol", {}),
        ("moco_v2", {"queue_size": 24}),
        ("swav", {"queue_length": 8, "queue_start_epoch": 1, "freeze_prototypes_iters": 3}),
    ],
)
def test_interrupted_run_resumes_to_identical_state(
    name: str,
    overrides: dict,
    slices: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Targets, queues and step counters are checkpointed: a resumed run ends bit for bit equal."""
    settings = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0}

    def run(directory: Path) -> dict[str, torch.Tensor]:
        method = make(name, **overrides)
        dataset = MultiViewDataset(slices, method.make_views({}, seed=0))
        train(method, dataset, settings, checkpoint_dir=directory, seed=0)
        return method.state_dict()

    uninterrupted = run(tmp_path / "whole")
    write_history = trainer._write_history

    def stop_after_first_epoch(directory: Path, history: list) -> None:
        write_history(directory, history)
        raise Interrupted

    monkeypatch.setattr(trainer, "_write_history", stop_after_first_epoch)
    with pytest.raises(Interrupted):
        run(tmp_path / "split")
    monkeypatch.setattr(trainer, "_write_history", write_history)
    resumed = run(tmp_path / "split")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)


@pytest.mark.parametrize(
    "key",
    sorted(set(SCHEMA_PRETRAIN_DEFAULTS) & set(TRAINER_DEFAULTS)),
)
def test_schema_default_equals_the_trainer_default(key: str) -> None:
    """A key the schema and the trainer both default must default to one value."""
    assert SCHEMA_PRETRAIN_DEFAULTS[key] == TRAINER_DEFAULTS[key]


def test_schema_defaults_cover_the_trainer_keys_it_lists() -> None:
    assert {"epochs", "batch_size", "precision", "checkpoint_every"} <= set(
        SCHEMA_PRETRAIN_DEFAULTS
    )


def test_unknown_scaling_and_precision_name_the_choices() -> None:
    with pytest.raises(
        UnknownNameError, match="unknown lr_scaling 'linaer'; did you mean 'linear'"
    ):
        trainer.train_settings({"lr_scaling": "linaer"})
    with pytest.raises(UnknownNameError, match="unknown precision 'bf61'.*known: auto, bf16, fp32"):
        trainer.train_settings({"precision": "bf61"})


def test_step_plan_drops_incomplete_batches_and_refuses_an_empty_epoch() -> None:
    config = trainer.train_settings({"epochs": 3, "batch_size": 8, "warmup_epochs": 0.5})
    plan = plan_steps(config, 37)
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (4, 12, 2)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        plan_steps(config, 37, world=3)
    with pytest.raises(ValueError, match="fewer than batch_size 8"):
        plan_steps(config, 7)
