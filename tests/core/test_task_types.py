"""The one table of task types answers what the config check, the plan and the split ask."""

from __future__ import annotations

import pytest

from medssl.core.registry import UnknownNameError
from medssl.core.task_types import TASK_TYPES, task_type_spec


def test_task_type_table_answers_what_stages_ask() -> None:
    assert TASK_TYPES.names() == ["binary", "multiclass", "multilabel", "segmentation"]
    assert task_type_spec("segmentation").labels_from_masks
    # Per-case Dice first: what selection and tables use by default.
    assert task_type_spec("segmentation").metrics == ("dice", "dice_global", "iou")
    assert task_type_spec("binary").metrics == ("auc", "accuracy", "f1", "balanced_accuracy")
    assert "balanced_accuracy" not in task_type_spec("multilabel").metrics
    assert task_type_spec("multilabel").multiple_columns
    assert not task_type_spec("binary").labels_from_masks
    with pytest.raises(UnknownNameError, match="did you mean 'binary'"):
        task_type_spec("binar")
