"""DDP on CPU: two gloo processes train like one process with the same global batch.

One pair of processes runs every case (process start-up and the torch import
dominate): SimCLR (negatives gathered from both ranks), Barlow Twins
(cross-correlation over the global batch, BatchNorm in the projector), BYOL
(BatchNorm everywhere, EMA target) and SwAV (Sinkhorn over the global batch),
plus SparK's sparse BatchNorm, whose statistics must cover the visible
positions of both ranks. The data are fixed views (no augmentation), so the
only difference between the runs is how the batch is split and reduced.
The command-line relaunch under torchrun is tested with the stage (tests/test_pretrain.py).

Both runs are in float64: in float32 the rounding of sums taken in another
order (~1e-7) is amplified by Barlow Twins' standardisation of 8 samples to
~1e-4 in the weights after three steps, which would hide a real error of
that size. In float64 losses agree to 1e-9 relative and weights to 1e-9.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from medssl.datasets import synthetic as synth
from medssl.models import backbones as models
from medssl.pretraining import distributed, syncbn
from medssl.pretraining.loop import train
from medssl.pretraining.methods import build_method
from medssl.pretraining.methods.sparse import MaskState, sparse_batch_norm

WORLD = 2
BATCH = 8
SETTINGS = {
    "epochs": 3,
    "batch_size": BATCH,
    "optimizer": "sgd",
    "lr": 0.1,
    "lr_scaling": "none",
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "warmup_epochs": 0,
    "checkpoint_every": 1,
}
"""Three epochs of one global batch each: a loss curve of three steps."""

CASES: dict[str, dict] = {
    "simclr": {"proj_dim": 16},
    "barlow_twins": {"proj_dims": [32, 32, 32]},
    "byol": {"hidden_dim": 32, "proj_dim": 16},
    "swav": {
        "hidden_dim": 32,
        "n_prototypes": 8,
        "n_local_crops": 0,
        "freeze_prototypes_iters": 1,
        "queue_length": 16,
        "queue_start_epoch": 1,
    },
}
"""Methods and narrowed heads; SwAV's queue of two global batches starts at epoch 1."""

MOCO = {"proj_dim": 16, "queue_size": 16}
"""MoCo's shuffle BN draws a permutation, so it is checked for consistency, not equality."""


class FixedViews(Dataset):
    """Two fixed views per synthetic CT slice: the slice and a shifted, noisier copy."""

    def __init__(self, n: int = BATCH, size: int = 32) -> None:
        volume = synth.make_volume(np.random.default_rng(0), n, size)
        slices = torch.from_numpy(volume.hu / 1000.0).float().unsqueeze(1)
        noise = torch.randn(slices.shape, generator=torch.Generator().manual_seed(1))
        self.views = [slices, torch.roll(slices, 3, dims=-1) + 0.1 * noise]

    def __len__(self) -> int:
        return len(self.views[0])

    def __getitem__(self, item: int) -> list[torch.Tensor]:
        return [view[item].to(torch.get_default_dtype()) for view in self.views]


def run_case(name: str, checkpoint_dir: Path) -> dict:
    """Train one method from a fixed initialisation in float64; loss curve and final state."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _run_case(name, checkpoint_dir)
    finally:
        torch.set_default_dtype(before)


def _run_case(name: str, checkpoint_dir: Path) -> dict:
    torch.manual_seed(0)
    method = build_method(name, models.build_backbone("resnet_small", 1), CASES.get(name, MOCO))
    result = train(method, FixedViews(), SETTINGS, checkpoint_dir=checkpoint_dir, seed=0)
    return {
        "losses": [row["loss"] for row in result.history],
        "state": {key: value.clone() for key, value in method.state_dict().items()},
    }


def sparse_norm_case() -> torch.Tensor:
    """Sparse BatchNorm output of this rank's half of a fixed masked batch."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 4, 4)
    active = torch.rand(4, 1, 2, 2) > 0.4
    active[:, :, 0, 0] = True
    norm = torch.nn.BatchNorm2d(3)
    syncbn.synchronize(norm)
    half = slice(2 * distributed.rank(), 2 * distributed.rank() + 2)
    if distributed.world_size() == 1:
        half = slice(0, 4)
    state = MaskState()
    with state.masking(active[half]):
        out = sparse_batch_norm(norm, state, x[half])
    return torch.cat([out.detach(), norm.running_var.view(1, 3, 1, 1).expand(1, 3, 4, 4)])


def worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: join the gloo group, run every case, rank 0 saves the results."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    try:
        results = {name: run_case(name, Path(out_dir) / name) for name in CASES}
        results["sparse_norm"] = sparse_norm_case()
        moco = run_case("moco_v2", Path(out_dir) / "moco_v2")
        results["moco_losses"] = moco["losses"]
        results["moco_queues"] = distributed.gather_detached(moco["state"]["queue"][None])
        results["moco_pointer"] = moco["state"]["queue_pointer"]
        gathered = distributed.gather_detached(results["sparse_norm"][:-1])
        if rank == 0:
            results["sparse_norm"] = torch.cat([gathered, results["sparse_norm"][-1:]])
            torch.save(results, Path(out_dir) / "ddp.pt")
    finally:
        distributed.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(worker, args=(free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    return torch.load(out / "ddp.pt", weights_only=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_processes_match_one_process(
    name: str, ddp_results: dict, tmp_path: Path, one_thread
) -> None:
    single = run_case(name, tmp_path)
    ddp = ddp_results[name]
    # The history's losses are float32 sums: one float32 ulp apart at most.
    np.testing.assert_allclose(ddp["losses"], single["losses"], rtol=3e-7)
    assert single["losses"][-1] != single["losses"][0]
    for key, value in single["state"].items():
        if value.is_floating_point():
            torch.testing.assert_close(ddp["state"][key], value, rtol=1e-9, atol=1e-9, msg=key)
        else:
            assert torch.equal(ddp["state"][key], value), key


def test_sparse_batch_norm_statistics_span_both_ranks(ddp_results: dict, one_thread) -> None:
    """Each rank's visible positions are normalised by the statistics of all visible positions."""
    single = sparse_norm_case()
    torch.testing.assert_close(ddp_results["sparse_norm"], single, rtol=1e-5, atol=1e-6)


def test_moco_queue_holds_every_ranks_keys_identically(ddp_results: dict) -> None:
    """Both ranks enqueue the gathered keys: after 3 steps of 8 the queues of 16 agree."""
    first, second = ddp_results["moco_queues"]
    assert torch.equal(first, second)
    assert np.isfinite(ddp_results["moco_losses"]).all()
    # 3 x 8 global keys went into a ring of 16 initialised with random vectors.
    assert int(ddp_results["moco_pointer"]) == 24 % 16
    torch.manual_seed(0)
    initial = build_method("moco_v2", models.build_backbone("resnet_small", 1), MOCO).queue
    assert not torch.isclose(first.float(), initial, atol=1e-3).all(dim=1).any()
