"""Reading a mask file: masks by row, and the per-slice labels the split stage uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medssl.datasets.hdf5 import read_meta
from medssl.datasets.mask_sources import build_masks, write_masks
from medssl.datasets.maskfile import MaskError, load_masks, mask_labels


@pytest.fixture(scope="module")
def lung(converted_cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The synthetic lung masks (first series of each patient annotated) as a mask file."""
    masks, annotated = build_masks(
        converted_cohort["h5"], "folder", converted_cohort["masks_dir"], "lung"
    )
    path = tmp_path_factory.mktemp("maskfile") / "lung.h5"
    write_masks(path, masks, annotated, {"structure": "lung"})
    return {"path": path, "masks": masks, "annotated": annotated}


def test_mask_labels_are_foreground_per_annotated_slice(converted_cohort: dict, lung: dict):
    meta = read_meta(converted_cohort["h5"])
    annotated = lung["annotated"]
    # The first series of each patient is annotated, the second is not.
    first = meta.groupby("patient_id")["series_uid"].transform("min")
    assert annotated.sum() == (meta["series_uid"] == first).sum()
    labels = mask_labels(lung["path"], converted_cohort["h5"])
    assert list(labels.columns) == ["sop_uid", "foreground"]
    assert set(labels["foreground"]) == {0, 1}  # lungs in the thorax, none in the pelvis
    assert lung["masks"][annotated].any(axis=(1, 2)).sum() == labels["foreground"].sum()
    pd.testing.assert_series_equal(
        labels["sop_uid"], meta.loc[annotated, "sop_uid"].reset_index(drop=True)
    )


def test_load_masks_in_the_order_given(lung: dict) -> None:
    rows = np.flatnonzero(lung["annotated"])[[5, 0, 5, 2]]
    np.testing.assert_array_equal(load_masks(lung["path"], rows), lung["masks"][rows])
    with pytest.raises(MaskError, match="have no annotation"):
        load_masks(lung["path"], np.flatnonzero(~lung["annotated"])[:1])


def test_not_a_mask_file(converted_cohort: dict, tmp_path: Path) -> None:
    with pytest.raises(MaskError, match="not a medssl mask file"):
        load_masks(converted_cohort["h5"], [0])
