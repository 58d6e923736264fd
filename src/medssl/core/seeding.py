"""One seed drives every random number generator of a run.

Python, NumPy and torch (and data-loader workers) are seeded from the run's
seed so that two CPU runs with the same settings give the same numbers.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace, which must be
        # chosen before CUDA starts; a value the user set wins.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a CUDA op without a deterministic kernel warns instead of
        # stopping a multi-day run; CPU runs are bit-identical (tests compare bytes).
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def worker_init(worker_id: int) -> None:
    """Seed NumPy and ``random`` inside a data-loader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
