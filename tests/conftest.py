"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one torch thread each, not two each.
    torch.set_num_threads(1)


SHARED_RUN_TESTS = tuple(
    f"tests/workflow/test_{name}.py" for name in ("kill", "reruns", "workflow")
)
"""Tests that edit or read the folder of the session's one workflow run
(tests/workflow/conftest.py) in turn: one scope, run one after another in one process."""
SLURM_TESTS = "tests/workflow/test_slurm.py"
"""The SLURM run, mostly waiting on the scheduler: its own scope, beside the shared run."""
SHARED_RUN_SCOPE = "tests/workflow/shared-run"


def scope_of(nodeid: str) -> str:
    """A test's scheduling scope: the shared-run scope, or its module."""
    module = nodeid.split("::", 1)[0]
    return SHARED_RUN_SCOPE if module in SHARED_RUN_TESTS else module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The two longest scopes first, the shared run then the SLURM run, so that with two
    workers each starts one of them while the short modules fill in around them."""
    first = {SHARED_RUN_SCOPE: 0, SLURM_TESTS: 1}
    items.sort(key=lambda item: first.get(scope_of(item.nodeid), 2))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's scheduler by :func:`scope_of`, in collection order
    (``--no-loadscope-reorder``): a module's tests stay on one worker, so its module
    fixtures are built once, and the shared-run tests share one worker."""
    from xdist.scheduler import LoadScopeScheduling

    class ScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return ScopeScheduling(config, log)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, restored afterwards.

    Runs compared bit for bit must share a thread count, and tiny batches on a
    small shared CPU run faster without OpenMP synchronisation.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def converted_cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small synthetic cohort as DICOM, its labels, lung masks, and the converted HDF5.

    8 patients x 2 series x 8 slices of 32 x 32, converted at 32 x 32 (the
    U-Net needs multiples of 32); shared by the task, protocol and mask tests.
    """
    from medssl.datasets.conversion import convert
    from medssl.datasets.synthetic import synthesize

    root = tmp_path_factory.mktemp("converted_cohort")
    settings = {"patients": 8, "series_per_patient": 2, "slices": 8, "matrix": 32, "scout": False}
    synthesize(root / "dicom", root / "labels.csv", settings, masks_dir=root / "masks")
    convert(
        root / "dicom",
        root / "data.h5",
        root / "rejects.csv",
        {
            "intensity": {"policy": "window", "windows": [{"center": -300, "width": 1600}]},
            "image_size": 32,
        },
    )
    return {
        "root": root,
        "dicom": root / "dicom",
        "labels": root / "labels.csv",
        "masks_dir": root / "masks",
        "h5": root / "data.h5",
    }
