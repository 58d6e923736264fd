"""The pretrain stage: CLI outputs, exact resumption after SIGKILL, divergence, trainer parts."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from medssl.models import backbones as models
from medssl.pretraining import loop as trainer
from medssl.pretraining import recipes as pretrain_module
from medssl.datasets.hdf5 import SliceDataset
from medssl.pretraining.methods import build_method
from medssl.pretraining.optimizers import LARS
from medssl.pretraining.recipes import main, pretrain
from medssl.pretraining.loop import NonFiniteLossError, warmup_cosine

SETTINGS = {
    "backbone": "resnet_small",
    "epochs": 2,
    "batch_size": 8,
    "lr": 0.05,
    "weight_decay": 1e-4,
    "optimizer": "adamw",
    "warmup_epochs": 1,
    "checkpoint_every": 1,
    "max_samples": None,
    "augment": {"crop_scale": [0.3, 1.0]},
    "simclr": {"temperature": 0.2, "proj_dim": 16},
}


def make_h5(path: Path, n: int = 32, channels: int = 1, size: int = 32, seed: int = 0) -> Path:
    """A tiny dataset in medssl.datasets.hdf5's layout: uint8 slices, model input = stored / 255."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as handle:
        stored = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
        images = handle.create_dataset("images", data=stored, chunks=(1, channels, size, size))
        images.attrs["policy"] = "window"
        images.attrs["scale"] = 1 / 255
        images.attrs["offset"] = 0.0
        images.attrs["channels"] = json.dumps(["window"] * channels)
        meta = handle.create_group("meta")
        strings = h5py.string_dtype()
        for name in ("patient_id", "study_uid", "series_uid", "sop_uid", "source_file"):
            meta.create_dataset(name, data=[f"{name}{i // 4}" for i in range(n)], dtype=strings)
        meta.create_dataset("slice_index", data=np.arange(n, dtype=np.int32) % 4)
        meta.create_dataset("z", data=np.arange(n, dtype=np.float64))
    return path


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    return make_h5(tmp_path / "pool.h5")


def cli_args(data: Path, out: Path, checkpoints: Path, settings: dict) -> list[str]:
    return [
        "--method",
        "simclr",
        "--data",
        str(data),
        "--settings",
        json.dumps(settings),
        "--seed",
        "3",
        "--out",
        str(out),
        "--checkpoint-dir",
        str(checkpoints),
        "--threads",
        "1",
        "--device",
        "cpu",
    ]


def test_cli_writes_encoder_sidecar_and_history(pool: Path, tmp_path: Path, one_thread) -> None:
    out = tmp_path / "init" / "simclr" / "encoder.pt"
    checkpoints = tmp_path / "pretrain" / "simclr"
    assert main(cli_args(pool, out, checkpoints, SETTINGS)) == 0
    assert out.exists() and out.with_suffix(".json").exists()
    model, info = models.load_encoder(out)
    assert info["backbone"] == "resnet_small" and info["in_channels"] == 1
    assert info["method"] == "simclr" and info["epochs"] == 2
    assert len(info["loss_history"]) == 2 and math.isfinite(info["final_loss"])
    assert info["provenance"]["stage"] == "pretrain" and info["provenance"]["seed"] == 3
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, models.feature_dim(model))
    history = pd.read_csv(checkpoints / "history.csv")
    assert list(history.columns) == trainer.HISTORY_COLUMNS
    assert history["data_wait_fraction"].between(0, 1).all()
    assert history["epoch"].tolist() == [1, 2]
    assert (history["images_per_s"] > 0).all()
    assert (checkpoints / "checkpoint.pt").exists()


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


_KILLABLE = """
import sys, time
import medssl.pretraining.loop as trainer
save = trainer.save_checkpoint

def save_then_wait(path, payload):
    save(path, payload)
    time.sleep(600)  # keep the job alive after its first checkpoint until the test kills it

trainer.save_checkpoint = save_then_wait
from medssl.pretraining.recipes import main
main(sys.argv[1:])
"""


def test_killed_run_resumes_to_identical_weights(pool: Path, tmp_path: Path, one_thread) -> None:
    settings = {**SETTINGS, "epochs": 3}
    reference = tmp_path / "reference.pt"
    main(cli_args(pool, reference, tmp_path / "ck_reference", settings))

    out = tmp_path / "resumed.pt"
    checkpoints = tmp_path / "ck_resumed"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    job = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, *cli_args(pool, out, checkpoints, settings)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (checkpoints / "checkpoint.pt").exists():
            assert job.poll() is None, job.stderr.read().decode() if job.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
        if job.stderr:
            job.stderr.close()
    assert not out.exists()
    state = trainer.load_checkpoint(checkpoints / "checkpoint.pt")
    assert state["epoch"] == 1

    main(cli_args(pool, out, checkpoints, settings))
    expected = torch.load(reference, weights_only=True)
    resumed = torch.load(out, weights_only=True)
    assert expected.keys() == resumed.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, resumed[key]), key
    first = json.loads(reference.with_suffix(".json").read_text())["loss_history"]
    second = json.loads(out.with_suffix(".json").read_text())["loss_history"]
    assert first == second


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
    with pytest.raises(SystemExit, match="loss became nan"):
        main(cli_args(pool, out, tmp_path / "ck2", SETTINGS))
    assert not out.exists()


def test_too_few_samples_for_a_batch(pool: Path, tmp_path: Path, one_thread) -> None:
    settings = {**SETTINGS, "max_samples": 4}
    with pytest.raises(ValueError, match="fewer than batch_size"):
        pretrain("simclr", pool, settings, 0, tmp_path / "e.pt", tmp_path / "ck", "cpu")


def test_warmup_cosine_schedule() -> None:
    factor = warmup_cosine(warmup_steps=4, total_steps=12)
    assert [factor(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(8) == pytest.approx(0.5)
    assert factor(12) == pytest.approx(0.0)
    assert warmup_cosine(0, 10)(0) == 1.0


def test_lars_step_matches_formula() -> None:
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS(
        [{"params": [weight]}, {"params": [bias], "weight_decay": 0.0, "lars_exclude": True}],
        lr=0.5,
        momentum=0.9,
        weight_decay=0.1,
    )
    weight.grad = torch.tensor([0.0, 1.0])
    bias.grad = torch.tensor([2.0])
    optimizer.step()
    update = torch.tensor([0.0, 1.0]) + 0.1 * torch.tensor([3.0, 4.0])
    trust = 0.001 * 5.0 / float(torch.linalg.vector_norm(update))
    expected = torch.tensor([3.0, 4.0]) - 0.5 * trust * update
    assert torch.allclose(weight.detach(), expected)
    assert torch.allclose(bias.detach(), torch.tensor([1.0 - 0.5 * 2.0]))


def test_unknown_optimizer_is_rejected() -> None:
    method = build_method("simclr", models.build_backbone("resnet_small", 1), {})
    with pytest.raises(ValueError, match="unknown optimizer"):
        trainer.build_optimizer(method, trainer.train_settings({"optimizer": "adagrad"}))


def test_continual_pretraining_starts_from_the_encoder_file(tmp_path: Path, one_thread) -> None:
    """``--init-encoder``: an RGB ResNet-18 with a repeated stem continues with SparK on CT.

    The sidecar of the start decides the backbone (settings say resnet_small),
    and after a few small steps the weights are still next to the start while
    a random start is far from it.
    """
    h5 = make_h5(tmp_path / "pool.h5", n=8, size=64)
    torch.manual_seed(1)
    start = models.adapt_stem(models.build_backbone("resnet18", 3), 1, "repeat")
    start_path = tmp_path / "start" / "encoder.pt"
    models.save_encoder(start, start_path, "resnet18", {"method": "import:torchvision"})
    settings = {
        **SETTINGS,
        "epochs": 1,
        "lr": 1e-5,
        "warmup_epochs": 0,
        "spark": {"mask_ratio": 0.6, "decoder_width": 64},
    }
    out = tmp_path / "init" / "encoder.pt"
    argv = ["--method", "spark", "--data", str(h5), "--settings", json.dumps(settings)]
    argv += ["--out", str(out), "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert main([*argv, "--init-encoder", str(start_path)]) == 0
    info = models.read_sidecar(out)
    assert info["backbone"] == "resnet18" and info["stem"] == "repeat"
    assert info["in_channels"] == 1 and info["init_encoder"]["path"] == str(start_path)
    before = torch.load(start_path, weights_only=True)
    after = torch.load(out, weights_only=True)
    fresh = models.build_backbone("resnet18", 3).state_dict()
    for key in ("conv1.weight", "layer2.0.conv1.weight", "layer4.1.conv2.weight"):
        moved = (after[key] - before[key]).norm()
        assert 0 < moved < 0.01 * before[key].norm(), key
        assert (fresh[key] - before[key]).norm() > 0.5 * before[key].norm(), key
