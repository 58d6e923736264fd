"""Partition and nested subsets: patient-level, stratified, deterministic, nested."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from medssl.core.registry import UnknownNameError
from medssl.core.task_types import TASK_TYPES
from medssl.datasets import splits as split
from medssl.datasets.hdf5 import read_meta
from medssl.datasets.splits import (
    SplitError,
    make_partition,
    make_subsets,
    read_label_table,
    select_training,
)
from medssl.pipeline.config import load_schema

BINARY_TASK = {"name": "nodule", "dataset": "d", "column": "nodule", "type": "binary"}
REGIONS = ("head", "chest", "abdomen")


def write_meta_h5(path: Path, patients: list[str], slices: int) -> None:
    """A minimal medssl HDF5 (tiny images; the split stage only reads metadata)."""
    n = len(patients) * slices
    string = h5py.string_dtype()
    with h5py.File(path, "w") as handle:
        images = handle.create_dataset("images", data=np.zeros((n, 1, 4, 4), np.uint8))
        images.attrs.update({"policy": "window", "scale": 1 / 255, "offset": 0.0, "channels": "[]"})
        meta = handle.create_group("meta")
        pids = [p for p in patients for _ in range(slices)]
        sops = [f"1.2.{p}.{s}" for p in patients for s in range(slices)]
        meta.create_dataset("patient_id", data=np.array(pids, dtype=object), dtype=string)
        meta.create_dataset("sop_uid", data=np.array(sops, dtype=object), dtype=string)


def cohort(tmp_path: Path, n_patients: int = 20, slices: int = 6) -> tuple[Path, Path]:
    """HDF5 + label table; a third of patients have no nodule, regions vary by patient."""
    patients = [f"{i:03d}" for i in range(n_patients)]  # leading zeros must survive CSVs
    h5 = tmp_path / "d.h5"
    write_meta_h5(h5, patients, slices)
    rng = np.random.default_rng(0)
    rows = []
    for i, patient in enumerate(patients):
        for s in range(slices):
            nodule = int(i % 3 != 0 and rng.random() < 0.5) if s else int(i % 3 != 0)
            region = REGIONS[i % 3] if s < slices - 1 else REGIONS[(i + 1) % 3]
            rows.append(
                {
                    "patient_id": patient,
                    "sop_uid": f"1.2.{patient}.{s}",
                    "nodule": nodule,
                    "region": region,
                }
            )
    labels = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return h5, labels


def partition_of(h5: Path, labels: Path, task: dict = BINARY_TASK) -> pd.DataFrame:
    table = read_label_table(labels, task.get("labels_key", "sop_uid"), task["column"])
    return make_partition(read_meta(h5), table, task, str(h5), str(labels))


def test_partition_is_deterministic_and_independent_of_subset_seeds(tmp_path: Path) -> None:
    h5, labels = cohort(tmp_path)
    first, second = partition_of(h5, labels), partition_of(h5, labels)
    pd.testing.assert_frame_equal(first, second)
    held_out = set(first.loc[first["split"] != "train", "index"])
    train = set(first.loc[first["split"] == "train", "index"])
    for seed in range(5):
        chosen = set(select_training(first, make_subsets(first, seed), 1.0))
        assert chosen == train and not chosen & held_out
    moved = partition_of(h5, labels, {**BINARY_TASK, "split": {"val": 0.2, "test": 0.2, "seed": 1}})
    assert not moved["split"].equals(first["split"])  # the split seed, not subset seeds, moves it


def test_strata_are_represented_in_every_split(tmp_path: Path) -> None:
    part = partition_of(*cohort(tmp_path, n_patients=30))
    per_patient = part.drop_duplicates("patient_id")
    assert set(per_patient["stratum"]) == {0, 1}
    for name in ("train", "val", "test"):
        assert set(per_patient.loc[per_patient["split"] == name, "stratum"]) == {0, 1}
    counts = per_patient["split"].value_counts()
    assert counts["val"] == counts["test"] == 6 and counts["train"] == 18


def test_subsets_nested_stratified_and_seeded(tmp_path: Path) -> None:
    part = partition_of(*cohort(tmp_path, n_patients=40))
    train_patients = part.loc[part["split"] == "train"].drop_duplicates("patient_id")
    subsets = make_subsets(part, seed=0)
    pd.testing.assert_frame_equal(subsets, make_subsets(part, seed=0))
    assert set(subsets["patient_id"]) == set(train_patients["patient_id"])
    previous: set[int] = set()
    for fraction in (0.1, 0.25, 0.5, 1.0):
        chosen = select_training(part, subsets, fraction)
        assert set(chosen) >= previous and len(chosen) > len(previous)
        previous = set(chosen)
        rows = part.set_index("index").loc[chosen]
        assert set(rows["stratum"]) == {0, 1}  # every stratum keeps a patient
        for stratum, n in train_patients["stratum"].value_counts().items():
            expected = max(1, int(np.floor(fraction * n + 0.5)))
            assert rows.loc[rows["stratum"] == stratum, "patient_id"].nunique() == expected
    whole = part.loc[part["split"] == "train", "index"].to_numpy()
    np.testing.assert_array_equal(select_training(part, subsets, 1.0), whole)
    other = [set(select_training(part, make_subsets(part, s), 0.25)) for s in (1, 2, 3)]
    assert any(o != set(select_training(part, subsets, 0.25)) for o in other)


def test_stale_subsets_are_refused(tmp_path: Path) -> None:
    part = partition_of(*cohort(tmp_path))
    subsets = make_subsets(part, 0).iloc[1:]
    with pytest.raises(SplitError, match="regenerate"):
        select_training(part, subsets, 0.5)
    with pytest.raises(SplitError, match="fraction"):
        select_training(part, make_subsets(part, 0), 0.0)


def test_multiclass_codes_and_strata(tmp_path: Path) -> None:
    task = {"name": "region", "dataset": "d", "column": "region", "type": "multiclass"}
    part = partition_of(*cohort(tmp_path), task)
    codes = dict(zip(part["label_name"], part["label"], strict=False))
    assert codes == {"abdomen": 0, "chest": 1, "head": 2}  # sorted order of the values
    # Every patient has 5 slices of its own region and 1 of the next: that is its stratum.
    first = part.groupby("patient_id")["label_name"].agg(lambda s: s.value_counts().idxmax())
    strata = part.drop_duplicates("patient_id").set_index("patient_id")["stratum"]
    assert (strata == first.map(codes)).all()


def test_unlabelled_slices_are_skipped(tmp_path: Path, caplog) -> None:
    h5, labels = cohort(tmp_path)
    table = pd.read_csv(labels, dtype={"patient_id": str})
    table.iloc[:-7].to_csv(labels, index=False)
    with caplog.at_level(logging.INFO):
        part = partition_of(h5, labels)
    assert len(part) == 120 - 7
    assert "7 of 120 slices have no label" in caplog.text


def test_errors_name_file_and_column(tmp_path: Path) -> None:
    h5, labels = cohort(tmp_path)
    with pytest.raises(SplitError, match=r"labels\.csv.*'malignancy'"):
        read_label_table(labels, "sop_uid", "malignancy")
    with pytest.raises(SplitError, match=r"labels\.csv.*'series_uid'"):
        read_label_table(labels, "series_uid", "nodule")
    table = pd.read_csv(labels, dtype={"patient_id": str})
    table.loc[3, "nodule"] = np.nan
    table.to_csv(labels, index=False)
    with pytest.raises(SplitError, match=r"labels\.csv: label column 'nodule' has 1 missing"):
        read_label_table(labels, "sop_uid", "nodule")
    h5, labels = cohort(tmp_path)
    region_as_binary = {**BINARY_TASK, "column": "region"}
    with pytest.raises(SplitError, match=r"labels\.csv: binary task .* 'region'"):
        partition_of(h5, labels, region_as_binary)


def test_too_few_patients(tmp_path: Path) -> None:
    with pytest.raises(SplitError, match="at least 3"):
        partition_of(*cohort(tmp_path, n_patients=2))
    part = partition_of(*cohort(tmp_path, n_patients=3))
    assert part.drop_duplicates("patient_id")["split"].value_counts().to_dict() == {
        "train": 1,
        "val": 1,
        "test": 1,
    }


# ------------------------------------------------- labels keyed by patient, study, series, image


@pytest.mark.parametrize("key", ["patient_id", "study_uid", "series_uid", "sop_uid"])
def test_labels_attach_by_each_key(converted_cohort: dict, tmp_path: Path, key: str) -> None:
    """A user's table keyed by any DICOM level labels every converted slice below that key."""
    meta = read_meta(converted_cohort["h5"])
    keys = sorted(meta[key].unique())
    table = pd.DataFrame({key: keys, "finding": [i % 2 for i in range(len(keys))]})
    table.to_csv(tmp_path / "user.csv", index=False)
    task = {"name": "t", "type": "binary", "column": "finding", "labels_key": key}
    labels = read_label_table(tmp_path / "user.csv", key, "finding")
    partition = make_partition(meta, labels, task, "data.h5", "user.csv")
    assert len(partition) == len(meta)
    expected = meta[key].map(dict(zip(table[key], table["finding"], strict=True)))
    np.testing.assert_array_equal(partition["label"], expected.loc[partition["index"]])


def test_unmatched_label_keys_are_an_error(converted_cohort: dict, tmp_path: Path) -> None:
    meta = read_meta(converted_cohort["h5"])
    patients = sorted(meta["patient_id"].unique())
    table = pd.DataFrame(
        {"patient_id": [*patients, "NOT-A-PATIENT"], "finding": [0, 1] * (len(patients) // 2) + [1]}
    )
    table.to_csv(tmp_path / "user.csv", index=False)
    labels = read_label_table(tmp_path / "user.csv", "patient_id", "finding")
    task = {"name": "t", "type": "binary", "column": "finding", "labels_key": "patient_id"}
    with pytest.raises(SplitError, match=r"user\.csv: 1 of .* match no slice.*NOT-A-PATIENT"):
        make_partition(meta, labels, task, "data.h5", "user.csv")
    partition = make_partition(meta, labels, {**task, "unmatched_labels": "warn"}, "d", "u")
    assert len(partition) == len(meta)


def test_multilabel_columns_must_be_binary(converted_cohort: dict, tmp_path: Path) -> None:
    labels = pd.read_csv(converted_cohort["labels"], dtype=str)
    labels.to_csv(tmp_path / "l.csv", index=False)
    task = {"name": "t", "type": "multilabel", "columns": ["nodule", "region"]}
    table = read_label_table(tmp_path / "l.csv", "sop_uid", ["nodule", "region"])
    with pytest.raises(SplitError, match=r"l\.csv: multilabel column 'region' must hold 0/1"):
        make_partition(read_meta(converted_cohort["h5"]), table, task, "d", str(tmp_path / "l.csv"))


def test_every_task_type_has_its_encoder_and_stratum_rule() -> None:
    """The task-type table names an encoder and a stratum rule this module has."""
    for spec in TASK_TYPES.values():
        assert spec.label_encoding in split.LABEL_ENCODERS, spec.name
        assert spec.stratum in split.STRATA, spec.name


def test_unknown_task_type_names_the_known_ones(tmp_path: Path) -> None:
    h5, labels = cohort(tmp_path)
    with pytest.raises(UnknownNameError, match="unknown task type 'binray'; did you mean 'binary'"):
        partition_of(h5, labels, {**BINARY_TASK, "type": "binray"})


def test_defaults_are_the_config_schemas() -> None:
    """Key by key: ``DEFAULT_SPLIT`` and the schema's ``tasks.*.split`` defaults."""
    tasks = load_schema()["properties"]["tasks"]["additionalProperties"]["properties"]
    schema = tasks["split"]["properties"]
    assert {key: spec["default"] for key, spec in schema.items()} == split.DEFAULT_SPLIT


def test_partition_files_reads_a_table_or_a_mask_file(tmp_path: Path) -> None:
    h5, labels = cohort(tmp_path)
    pd.testing.assert_frame_equal(
        split.partition_files(h5, labels, BINARY_TASK), partition_of(h5, labels)
    )
    with pytest.raises(SplitError, match="JSON object with 'type'"):
        split.partition_files(h5, labels, ["binary"])


# --------------------------------------------------------------- official splits

OFFICIAL_TASK = {
    "name": "tb",
    "dataset": "d",
    "column": "finding",
    "type": "binary",
    "split": {"source": "official", "val": 0.25, "seed": 0},
}


def official_cohort(
    n_patients: int = 12, lists: dict[str, range] | None = None, slices: int = 2
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metadata and a label table with official_split: by default patients 0-8 train, 9-11 test."""
    lists = lists or {"train": range(0, 9), "test": range(9, 12)}
    split_of = {p: name for name, ids in lists.items() for p in ids}
    rows = [
        {
            "sop_uid": f"1.2.{p}.{s}",
            "patient_id": f"P{p:02d}",
            "finding": int(p % 3 == 0),
            "official_split": split_of.get(p, ""),
        }
        for p in range(n_patients)
        for s in range(slices)
    ]
    labels = pd.DataFrame(rows)
    return labels[["sop_uid", "patient_id"]].copy(), labels


def patients_in(partition: pd.DataFrame, split_name: str) -> set[str]:
    return set(partition.loc[partition["split"] == split_name, "patient_id"])


def test_official_test_split_is_kept_and_val_is_carved_from_train() -> None:
    meta, labels = official_cohort()
    partition = make_partition(meta, labels, OFFICIAL_TASK, "d.h5", "labels.csv")
    assert patients_in(partition, "test") == {"P09", "P10", "P11"}
    val = patients_in(partition, "val")
    official_train = {f"P{p:02d}" for p in range(9)}
    # per stratum, halves up: 0.25 * 3 positive -> 1, 0.25 * 6 negative -> 2
    assert val < official_train and len(val) == 3
    assert {1, 0} <= set(partition.loc[partition["split"] == "val", "label"])  # stratified
    assert partition.groupby("patient_id")["split"].nunique().max() == 1
    report = partition.attrs["split"]
    assert report["source"] == "official" and report["test"] == "official"
    assert report["val"].startswith("carved from the official train part: 3")
    again = make_partition(meta, labels, OFFICIAL_TASK, "d.h5", "labels.csv")
    pd.testing.assert_frame_equal(partition, again)
    other_seed = {**OFFICIAL_TASK, "split": {**OFFICIAL_TASK["split"], "seed": 5}}
    other = make_partition(meta, labels, other_seed, "d.h5", "labels.csv")
    assert patients_in(other, "test") == patients_in(partition, "test")


def test_an_official_val_split_is_used_as_released_and_a_missing_test_is_carved() -> None:
    meta, labels = official_cohort(lists={"train": range(0, 9), "val": range(9, 12)})
    partition = make_partition(meta, labels, OFFICIAL_TASK, "d.h5", "labels.csv")
    assert patients_in(partition, "val") == {"P09", "P10", "P11"}
    test = patients_in(partition, "test")
    assert test and test < {f"P{p:02d}" for p in range(9)}
    assert partition.attrs["split"]["val"] == "official"
    assert partition.attrs["split"]["test"].startswith("carved")


def test_a_patient_on_two_official_lists_goes_to_test_and_is_reported(caplog) -> None:
    meta, labels = official_cohort()
    labels.loc[labels["sop_uid"] == "1.2.4.1", "official_split"] = "test"  # P04's 2nd image
    with caplog.at_level(logging.WARNING):
        partition = make_partition(meta, labels, OFFICIAL_TASK, "d.h5", "labels.csv")
    assert patients_in(partition, "test") == {"P04", "P09", "P10", "P11"}
    assert partition.groupby("patient_id")["split"].nunique().max() == 1
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "1 patient(s) are on several official split lists" in warning.getMessage()
    assert "P04" in warning.getMessage() and "strictest: test" in warning.getMessage()
    report = partition.attrs["split"]
    assert report["conflicting_patients"] == 1
    assert report["conflict_examples"] == {"P04": ["test", "train"]}


def test_official_split_needs_the_column_and_a_value_per_slice() -> None:
    meta, labels = official_cohort()
    with pytest.raises(SplitError, match="labels.csv: split source 'official' needs column"):
        make_partition(
            meta, labels.drop(columns="official_split"), OFFICIAL_TASK, "d", "labels.csv"
        )
    labels.loc[labels["patient_id"] == "P02", "official_split"] = ""
    with pytest.raises(SplitError, match=r"2 slices of 1 patients have none \(first: \['P02'\]\)"):
        make_partition(meta, labels, OFFICIAL_TASK, "d", "labels.csv")
    labels["official_split"] = "holdout"
    with pytest.raises(SplitError, match=r"column 'official_split' has \['holdout'\]"):
        make_partition(meta, labels, OFFICIAL_TASK, "d", "labels.csv")
    with pytest.raises(UnknownNameError, match="unknown split source 'offical'"):
        bad = {**OFFICIAL_TASK, "split": {"source": "offical"}}
        make_partition(meta, labels, bad, "d", "labels.csv")


def test_training_fractions_stay_nested_inside_the_official_train_part() -> None:
    meta, labels = official_cohort(
        n_patients=24, lists={"train": range(0, 18), "test": range(18, 24)}
    )
    partition = make_partition(meta, labels, OFFICIAL_TASK, "d.h5", "labels.csv")
    train_rows = set(partition.loc[partition["split"] == "train", "index"])
    held_out = set(partition.loc[partition["split"] != "train", "index"])
    for seed in (0, 1):
        subsets = make_subsets(partition, seed)
        chosen = [set(select_training(partition, subsets, f)) for f in (0.25, 0.5, 1.0)]
        assert chosen[0] <= chosen[1] <= chosen[2] == train_rows
        assert not chosen[2] & held_out
        patients = set(partition.loc[partition["index"].isin(chosen[0]), "patient_id"])
        picked = partition.loc[partition["patient_id"].isin(patients), "index"]
        assert set(picked) == chosen[0]  # whole patients


def test_official_split_read_from_a_label_csv(tmp_path: Path) -> None:
    meta, labels = official_cohort()
    labels.loc[labels["patient_id"] == "P00", "official_split"] = "train"
    path = tmp_path / "d.labels.csv"
    labels.to_csv(path, index=False)
    table = read_label_table(path, "sop_uid", "finding", ("official_split",))
    assert table["official_split"].tolist() == labels["official_split"].tolist()
    partition = make_partition(meta, table, OFFICIAL_TASK, "d.h5", str(path))
    assert patients_in(partition, "test") == {"P09", "P10", "P11"}


def test_uncertain_and_soft_multilabel_values_travel_in_the_partition(tmp_path: Path) -> None:
    """-1 (left out) and soft labels are kept per label; the bits stratify on value >= 0.5."""
    h5, labels = cohort(tmp_path)
    table = pd.read_csv(labels, dtype={"patient_id": str})
    table["edema"] = np.resize([1.0, 0.0, -1.0, 0.7, 0.3], len(table))
    table.to_csv(labels, index=False)
    task = {"name": "t", "type": "multilabel", "columns": ["nodule", "edema"]}
    frame = read_label_table(labels, "sop_uid", ["nodule", "edema"])
    partition = make_partition(read_meta(h5), frame, task, "d", str(labels))
    partition.to_csv(tmp_path / "partition.csv", index=False)
    reread = split.read_partition(tmp_path / "partition.csv")
    values = split.parse_targets(reread["targets"], 2)
    by_uid = table.set_index("sop_uid")
    uids = read_meta(h5)["sop_uid"].to_numpy()[reread["index"]]
    np.testing.assert_array_equal(values, by_uid.loc[uids, ["nodule", "edema"]].to_numpy())
    edema_bit = (reread["label"].to_numpy() >> 1) & 1
    np.testing.assert_array_equal(edema_bit, (values[:, 1] >= 0.5).astype(int))
    binary = make_partition(read_meta(h5), frame.assign(edema=0), task, "d", "l")
    assert "targets" not in binary.columns  # 0/1 only: the bits say everything


def test_multilabel_values_outside_zero_one_and_minus_one_are_refused(tmp_path: Path) -> None:
    h5, labels = cohort(tmp_path)
    table = pd.read_csv(labels, dtype={"patient_id": str}).assign(edema=2.0)
    table.to_csv(labels, index=False)
    frame = read_label_table(labels, "sop_uid", ["nodule", "edema"])
    task = {"name": "t", "type": "multilabel", "columns": ["nodule", "edema"]}
    with pytest.raises(SplitError, match=r"column 'edema' must hold 0/1 .*found \['2.0'\]"):
        make_partition(read_meta(h5), frame, task, "d", str(labels))
