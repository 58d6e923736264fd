"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one torch thread each, not two each.
    torch.set_num_threads(1)


WORKFLOW_TESTS = "tests/workflow/"
"""Whole-workflow tests: they share one run (tests/workflow/conftest.py) and edit or
read its folder in turn, so they run one after another in one process."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Whole-workflow tests first: with two workers they are the longest share of the
    suite, so one worker starts them while the other takes the rest."""
    items.sort(key=lambda item: not item.nodeid.startswith(WORKFLOW_TESTS))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's scheduler by module, with every whole-workflow test in one scope.

    A module's tests stay on one worker (its module fixtures are built once), and
    the whole-workflow modules share one worker and one run.
    """
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return WORKFLOW_TESTS if module.startswith(WORKFLOW_TESTS) else module

    return ModuleScheduling(config, log)


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
