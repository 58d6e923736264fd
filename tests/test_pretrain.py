"""Stage ``pretrain``: outputs, resumption after SIGKILL, failures, SparK, torchrun relaunch."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from medssl.models import backbones as models
from medssl.pretrain import main, without_nproc
from medssl.pretraining import loop as trainer
from tests.pretraining.hdf5_pool import SETTINGS, cli_args, make_h5


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    return make_h5(tmp_path / "pool.h5")


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


_KILLABLE = """
import sys, time
import medssl.pretraining.loop as trainer
save = trainer.save_checkpoint

def save_then_wait(path, payload):
    save(path, payload)
    time.sleep(600)  # keep the job alive after its first checkpoint until the test kills it

trainer.save_checkpoint = save_then_wait
from medssl.pretrain import main, without_nproc
sys.exit(main(sys.argv[1:]))
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


def test_cli_pretrains_spark_one_epoch(tmp_path: Path) -> None:
    pool = make_h5(tmp_path / "pool.h5", n=8, size=64)
    settings = {
        "backbone": "resnet_small",
        "epochs": 1,
        "batch_size": 4,
        "lr": 2e-4,
        "lr_scaling": "linear",
        "optimizer": "lamb",
        "weight_decay": 0.04,
        "warmup_epochs": 1,
        "grad_clip": 5.0,
        "augment": {},
        "spark": {"mask_ratio": 0.6, "decoder_width": 32, "augment": {}},
    }
    out = tmp_path / "init" / "spark" / "encoder.pt"
    args = ["--method", "spark", "--data", str(pool), "--settings", json.dumps(settings)]
    args += ["--out", str(out), "--checkpoint-dir", str(tmp_path / "ck"), "--device", "cpu"]
    assert main(args) == 0
    model, info = models.load_encoder(out)
    assert info["method"] == "spark" and info["epochs"] == 1
    assert math.isfinite(info["final_loss"])
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 256)


def test_cli_relaunches_under_torchrun_and_rank_zero_writes(tmp_path: Path) -> None:
    """``--nproc 2`` on CPU: two gloo ranks, one encoder, one history, global batch 8."""
    pool = make_h5(tmp_path / "pool.h5", n=16)
    settings = {
        "backbone": "resnet_small",
        "epochs": 1,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 1e-3,
        "warmup_epochs": 0,
        "simclr": {"proj_dim": 16},
    }
    out, checkpoints = tmp_path / "encoder.pt", tmp_path / "ck"
    command = [
        sys.executable,
        "-m",
        "medssl.pretrain",
        "--method",
        "simclr",
        "--data",
        str(pool),
        "--settings",
        json.dumps(settings),
        "--out",
        str(out),
        "--checkpoint-dir",
        str(checkpoints),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--nproc",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 of 2 joined (gloo" in done.stderr
    model, info = models.load_encoder(out)
    assert info["epochs"] == 1
    history = pd.read_csv(checkpoints / "history.csv")
    assert len(history) == 1 and history["images_per_s"].iloc[0] > 0
    state = torch.load(checkpoints / "checkpoint.pt", weights_only=True)
    assert json.loads(state["fingerprint"])["world_size"] == 2


def test_diverged_loss_exits_1_with_one_line_and_no_encoder(
    pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread, caplog
) -> None:
    import medssl.pretraining.methods.simclr as simclr

    monkeypatch.setattr(simclr, "nt_xent", lambda z1, z2, t: (z1.sum() + z2.sum()) * float("nan"))
    out = tmp_path / "encoder.pt"
    assert main(cli_args(pool, out, tmp_path / "ck", SETTINGS)) == 1
    assert not out.exists() and not out.with_suffix(".json").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(
        "error: pretrain: pre-training loss became nan"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--method", "simclrr"], "unknown method 'simclrr'; did you mean 'simclr'?"),
        (["--nproc", "0"], "--nproc must be at least 1, got 0"),
        (["--settings", "[1, 2]"], None),
    ],
)
def test_bad_arguments_are_refused(
    pool: Path, tmp_path: Path, change: list[str], message: str | None, caplog
) -> None:
    """A bad method or process count is one error line and status 1; a bad type is a usage error."""
    argv = cli_args(pool, tmp_path / "encoder.pt", tmp_path / "ck", SETTINGS)
    if change[0] in argv:
        flag = argv.index(change[0])
        argv[flag : flag + 2] = change
    else:
        argv += change
    if message is None:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        return
    assert main(argv) == 1
    assert f"error: pretrain: {message}" in caplog.text
    assert not (tmp_path / "encoder.pt").exists()


def test_relaunch_forwards_everything_but_the_process_count() -> None:
    argv = ["--method", "spark", "--nproc", "4", "--gpus=2", "--seed", "1", "--threads", "2"]
    assert without_nproc(argv) == ["--method", "spark", "--seed", "1", "--threads", "2"]
