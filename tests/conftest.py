"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one torch thread each, not two each.
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep a module's tests on one pytest-xdist worker (``--dist loadgroup``), so its
    module-scoped fixtures are built once, and every whole-workflow test on one worker,
    since they share the session's one workflow run."""
    root = Path(str(config.rootpath))
    for item in items:
        if "workflow" in item.keywords:
            group = "workflow"
        else:
            group = Path(str(item.path)).relative_to(root).as_posix()
        item.add_marker(pytest.mark.xdist_group(group))


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
