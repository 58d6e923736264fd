"""Patient-level, stratified train/val/test partition and nested training subsets.

Written by ``python -m medssl.split`` (:mod:`medssl.split`).

The partition is the one place where labels meet images: the label table is
joined to the HDF5 metadata on the task's ``labels_key`` and every labelled
slice gets an integer label code, a split and its patient's stratum. Whole
patients go to one split, because slices of one patient are strongly
correlated and splitting them would leak test information into training.

Where the split comes from is the task's ``split.source``: ``random`` (the
default) draws val and test by patient with the fractions ``val`` and
``test``; ``official`` takes the release's own split from the label table's
``official_split`` column (:func:`official_splits`), carving a missing val
(or test) by patient from the training part. A patient whom the release
lists in two splits is moved to the stricter one (test, then val), so no
patient sits in two splits and the released test set stays as it is where
it can; the count and the rule go to the log and the partition's sidecar.

Val and test depend only on the task's ``split`` settings, never on the
fine-tuning seeds or fractions, so every run of a task is scored on the same
patients. Training subsets (``make_subsets``/``select_training``) are drawn
from the training patients only; see docs/architecture.md for the contract.

What a task type means here (its label encoding, its stratum rule, whether
its labels are a mask file) comes from :mod:`medssl.core.task_types`; nothing
in this module asks for a type by name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medssl.core.registry import Registry, look_up
from medssl.core.task_types import task_type_spec
from medssl.datasets.hdf5 import read_meta
from medssl.datasets.maskfile import mask_labels

log = logging.getLogger(__name__)

PARTITION_COLUMNS = ("index", "patient_id", "label", "label_name", "split", "stratum")
SUBSET_COLUMNS = ("patient_id", "stratum", "rank")
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = {"source": "random", "val": 0.2, "test": 0.2, "seed": 0}
SPLIT_SOURCES = ("random", "official")
OFFICIAL_COLUMN = "official_split"
STRICTER_FIRST = ("test", "val", "train")
TARGETS_COLUMN = "targets"
"""Optional partition column: the per-label values of a multilabel task (see multilabel_targets)."""
IGNORED_TARGET = -1.0
"""A multilabel value that is left out of the loss and the metrics (an uncertain label)."""
"""A patient on two official lists goes to the first of these it is on."""
CONFLICT_RULE = (
    "a patient on several official lists goes to the strictest: test, then val, then train"
)


class SplitError(ValueError):
    """Labels or settings that cannot be partitioned; the message names the file and column."""


def round_half_up(value: float) -> int:
    """Round halves up (0.5 -> 1), unlike Python's banker's ``round``.

    Subset sizes such as ``0.25 * 10`` must not shrink to 2 just because 2 is
    even; the tiny epsilon absorbs float error such as ``0.35 * 10 = 3.4999...``.
    """
    return int(math.floor(value + 0.5 + 1e-9))


# ----------------------------------------------------------------------------- labels


def label_columns(task: dict) -> list[str]:
    """The label-table columns a task reads: ``foreground`` (labels from the mask
    file), ``columns`` (one column per label) or ``column``."""
    spec = task_type_spec(task["type"])
    if spec.labels_from_masks:
        return ["foreground"]
    if spec.multiple_columns:
        columns = list(task.get("columns") or [])
        if not columns:
            raise SplitError(f"task {task.get('name')!r}: {task['type']} needs 'columns'")
        return columns
    if "column" not in task:
        raise SplitError(f"task {task.get('name')!r}: {task['type']} needs 'column'")
    return [task["column"]]


def read_label_table(
    path: str | Path, key: str, column: str | list[str], extra: tuple[str, ...] = ()
) -> pd.DataFrame:
    """Read ``key`` and the label column(s) of a CSV, checking they exist and are complete.

    The key is read as text: UIDs such as ``1.2`` or patient ids such as
    ``007`` must not be turned into numbers and then fail to match. ``extra``
    columns (e.g. ``official_split``) are read as text too, blanks as ``""``.
    """
    path = Path(path)
    columns = [column] if isinstance(column, str) else list(column)
    if not path.is_file():
        raise SplitError(f"{path}: label table not found")
    header = pd.read_csv(path, nrows=0).columns
    roles = ((key, "labels_key"), *((c, "label column") for c in columns))
    for name, role in (*roles, *((c, "split source 'official'") for c in extra)):
        if name not in header:
            raise SplitError(f"{path}: no column {name!r} ({role}); columns are {list(header)}")
    text = {name: str for name in (key, *extra)}
    table = pd.read_csv(path, usecols=[key, *columns, *extra], dtype=text)
    for name in extra:
        table[name] = table[name].fillna("").str.strip()
    missing_key = table[key].isna()
    if missing_key.any():
        raise SplitError(
            f"{path}: column {key!r} (labels_key) is empty in {int(missing_key.sum())} rows"
        )
    for name in columns:
        missing = table[name].isna()
        if missing.any():
            rows = (np.flatnonzero(missing.to_numpy())[:5] + 2).tolist()  # +2: header, 1-based
            raise SplitError(
                f"{path}: label column {name!r} has {int(missing.sum())} missing values "
                f"(first at lines {rows})"
            )
    table = table.drop_duplicates()
    conflicting = table[key].duplicated(keep=False)
    if conflicting.any():
        examples = sorted(table.loc[conflicting, key].unique())[:5]
        raise SplitError(f"{path}: {key!r} values with conflicting {columns} labels: {examples}")
    return table.reset_index(drop=True)


def encode_labels(values: pd.Series, task_type: str, source: str, column: str) -> pd.Series:
    """Integer codes 0..K-1 in sorted order of the distinct values.

    Sorting makes the code of a value independent of row order, so 0/1 labels
    keep their meaning and the positive class of a binary task is the larger
    value. How many values a column may hold follows from the type's stratum
    rule (:attr:`StratumRule.values`).
    """
    classes = sorted(values.unique().tolist())
    least, most = STRATA[task_type_spec(task_type).stratum].values
    if most is not None and len(classes) != most:
        raise SplitError(
            f"{source}: {task_type} task needs exactly {_count_word(most)} values in column "
            f"{column!r}, found {len(classes)}: {classes[:10]}"
        )
    if len(classes) < least:
        raise SplitError(
            f"{source}: {task_type} task needs at least {_count_word(least)} values in column "
            f"{column!r}, found {classes}"
        )
    codes = {value: code for code, value in enumerate(classes)}
    return values.map(codes).astype(np.int64)


def _count_word(count: int) -> str:
    """Small counts in words, as a person writes them ("exactly two values")."""
    return {1: "one", 2: "two", 3: "three"}.get(count, str(count))


def _encode_single(frame: pd.DataFrame, task: dict, source: str) -> tuple[pd.Series, pd.Series]:
    column = task["column"]
    codes = encode_labels(frame[column], task["type"], source, column)
    return codes, frame[column].astype(str)


def _encode_multilabel(frame: pd.DataFrame, task: dict, source: str) -> tuple[pd.Series, pd.Series]:
    """Labels as a bit mask (bit j = ``columns[j]``), names as ``a|c`` ('' for none).

    One integer column keeps the partition file's layout the same for every
    task type; 62 labels fit, far more than any benchmark in the field uses.
    A value other than 0/1 (an uncertain label left out, -1, or a soft label in
    (0, 1)) sets its bit when it is at least 0.5, for stratification only: the
    values themselves travel in the partition's ``targets`` column
    (:func:`multilabel_targets`).
    """
    columns = label_columns(task)
    if len(columns) > 62:
        raise SplitError(f"task {task.get('name')!r}: at most 62 multilabel columns")
    codes = pd.Series(0, index=frame.index, dtype=np.int64)
    names = pd.Series("", index=frame.index, dtype=object)
    for bit, column in enumerate(columns):
        positive = _multilabel_values(frame[column], source, column) >= 0.5
        codes += positive.astype(np.int64) << bit
        names = names.where(~positive, names + np.where(names == "", "", "|") + column)
    return codes, names.astype(str)


def _multilabel_values(values: pd.Series, source: str, column: str) -> np.ndarray:
    """One multilabel column as floats: 0, 1, :data:`IGNORED_TARGET` or a soft label in (0, 1)."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    valid = (numbers == IGNORED_TARGET) | ((numbers >= 0) & (numbers <= 1))
    if not valid.all():
        raise SplitError(
            f"{source}: multilabel column {column!r} must hold 0/1 (or -1 for a label left "
            f"out, or a soft label in (0, 1)), found "
            f"{sorted(map(str, values[~valid].unique()))[:5]}"
        )
    return numbers


def multilabel_targets(frame: pd.DataFrame, task: dict, source: str) -> pd.Series | None:
    """The per-label training targets of a multilabel task as text (``1;0;-1;0.7312``),
    or None when every value is 0 or 1 and the partition's bits say everything.

    Uncertain CheXpert labels under the ``ignore`` policy (-1: masked out of the
    loss and of the metrics) and soft labels of ``lsr_ones`` (trained on as
    given, left out of the metrics) need the values, not only the bits.
    """
    columns = label_columns(task)
    values = np.column_stack([_multilabel_values(frame[c], source, c) for c in columns])
    if np.isin(values, (0.0, 1.0)).all():
        return None
    text = [";".join(f"{v:.6g}" for v in row) for row in values]
    return pd.Series(text, index=frame.index, dtype=object)


def parse_targets(text: pd.Series, n_labels: int, source: str = "<partition>") -> np.ndarray:
    """The ``targets`` column of a partition back to an (N, L) float array."""
    rows = [str(value).split(";") for value in text]
    if any(len(row) != n_labels for row in rows):
        raise SplitError(f"{source}: a 'targets' value does not hold {n_labels} labels")
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), n_labels)


def _encode_foreground(frame: pd.DataFrame, task: dict, source: str) -> tuple[pd.Series, pd.Series]:
    """Segmentation: 1 when the slice shows the structure (only stratifies the split)."""
    codes = frame["foreground"].astype(np.int64)
    return codes, codes.map({0: "background", 1: "foreground"}).astype(str)


LabelEncoder = Callable[[pd.DataFrame, dict, str], tuple[pd.Series, pd.Series]]
LABEL_ENCODERS: Registry[LabelEncoder] = Registry(
    "label encoding",
    {"single": _encode_single, "bits": _encode_multilabel, "foreground": _encode_foreground},
)
"""Per ``label_encoding`` of a task type: label-table rows -> (integer codes, readable names)."""


# -------------------------------------------------------------------------- partition


def _any_positive(frame: pd.DataFrame) -> pd.Series:
    """1 if any slice of the patient is positive (code 1), else 0."""
    return frame.groupby("patient_id")["label"].max().astype(np.int64)


def _majority_class(frame: pd.DataFrame) -> pd.Series:
    """The patient's most frequent class, the smallest code on ties, so the result
    does not depend on row order."""
    counts = frame.groupby(["patient_id", "label"]).size().rename("n").reset_index()
    counts = counts.sort_values(["patient_id", "n", "label"], ascending=[True, False, True])
    return counts.drop_duplicates("patient_id").set_index("patient_id")["label"].astype(np.int64)


def _rarest_label(frame: pd.DataFrame) -> pd.Series:
    """1 + the rarest label (fewest positive patients) the patient has, 0 for none.

    A stratum per label combination would leave most strata with one patient,
    while this keeps every label represented in each split as far as the
    rarest labels allow.
    """
    bits = frame.groupby("patient_id")["label"].agg(lambda codes: int(np.bitwise_or.reduce(codes)))
    n_bits = max(int(bits.max()).bit_length(), 1)
    has = np.array([[(b >> j) & 1 for j in range(n_bits)] for b in bits], dtype=bool)
    rarity = np.argsort(has.sum(0), kind="stable")  # rarest label first
    strata = np.zeros(len(bits), dtype=np.int64)
    for j in rarity[::-1]:  # rarest written last, so it wins
        strata[has[:, j]] = j + 1
    return pd.Series(strata, index=bits.index)


@dataclass(frozen=True)
class StratumRule:
    """How a patient's stratum is formed from its slices' label codes.

    ``values``: the (least, most) distinct values a single label column may
    hold under this rule (``most`` None: no limit). "Any positive" needs the
    one positive value of two; a majority needs classes to choose between.
    """

    strata: Callable[[pd.DataFrame], pd.Series]
    values: tuple[int, int | None]


STRATA: Registry[StratumRule] = Registry(
    "stratum rule",
    {
        "any_positive": StratumRule(_any_positive, (2, 2)),
        "majority_class": StratumRule(_majority_class, (2, None)),
        "rarest_label": StratumRule(_rarest_label, (1, None)),
    },
)
"""Per ``stratum`` of a task type (:mod:`medssl.core.task_types`)."""


def patient_strata(frame: pd.DataFrame, task_type: str) -> pd.Series:
    """The stratum of each patient (index: patient_id), by the task type's stratum rule."""
    return STRATA[task_type_spec(task_type).stratum].strata(frame)


def assign_splits(strata: pd.Series, val: float, test: float, seed: int) -> pd.Series:
    """Map each patient (index of ``strata``) to train/val/test, stratified.

    Inside each stratum the patients (sorted, then shuffled with ``seed``) take
    val, then test, then train places by the configured fractions. If a split
    ends up empty overall it takes a patient from the largest split, so every
    split exists whenever there are at least three patients.
    """
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise SplitError(
            f"split fractions val={val}, test={test} must be in (0, 1) and leave room for train"
        )
    n_patients = len(strata)
    if n_patients < 3:
        raise SplitError(f"{n_patients} labelled patients: a train/val/test split needs at least 3")
    rng = np.random.default_rng(seed)
    split: dict[Any, str] = {}
    members: dict[str, dict[int, list]] = {name: {} for name in SPLITS}
    for stratum in sorted(strata.unique()):
        patients = sorted(strata.index[strata == stratum])
        order = [patients[i] for i in rng.permutation(len(patients))]
        n = len(order)
        n_val = round_half_up(val * n)
        n_test = min(round_half_up(test * n), n - n_val)
        parts = {
            "val": order[:n_val],
            "test": order[n_val : n_val + n_test],
            "train": order[n_val + n_test :],
        }
        for name, chosen in parts.items():
            members[name][stratum] = list(chosen)
            split.update(dict.fromkeys(chosen, name))
    for empty in SPLITS:
        if any(members[empty].values()):
            continue
        donor = max(SPLITS, key=lambda s: (sum(map(len, members[s].values())), s == "train"))
        stratum = max(members[donor], key=lambda k: (len(members[donor][k]), -k))
        patient = members[donor][stratum].pop()
        members[empty].setdefault(stratum, []).append(patient)
        split[patient] = empty
        log.info("split %r was empty: moved patient %s from %r", empty, patient, donor)
    return pd.Series(split, name="split").reindex(strata.index)


def _carve(strata: pd.Series, fraction: float, rng: np.random.Generator) -> list:
    """Patients drawn from ``strata`` (index: patient) for a carved split, stratified.

    Inside each stratum (sorted patients, shuffled) the first
    ``round(fraction * n)`` are taken; when that leaves the carved split empty
    one patient of the largest stratum is, so the split exists whenever the
    part has two patients.
    """
    chosen: list = []
    largest: list = []
    for stratum in sorted(strata.unique()):
        patients = sorted(strata.index[strata == stratum])
        order = [patients[i] for i in rng.permutation(len(patients))]
        chosen += order[: min(round_half_up(fraction * len(order)), len(order) - 1)]
        if len(order) > len(largest):
            largest = order
    if not chosen and len(strata) >= 2:
        chosen = largest[:1]
    return chosen


def official_splits(
    rows: pd.DataFrame, strata: pd.Series, val: float, test: float, seed: int, origin: str
) -> tuple[pd.Series, dict]:
    """Each patient's split from the release's ``official_split`` of its slices, and a report.

    ``rows``: patient_id and official_split per labelled slice. A patient on
    several lists goes to the strictest (:data:`STRICTER_FIRST`; logged as a
    WARNING). A release without a val split gets one carved by patient from
    its training part (fraction ``val`` of the training patients, stratified,
    seeded); one without a test split gets one carved likewise (fraction
    ``test``). The report says what was done, for the partition's sidecar.
    """
    if not 0 < val < 1 or not 0 < test < 1:
        raise SplitError(f"split fractions val={val}, test={test} must be in (0, 1)")
    official = rows[OFFICIAL_COLUMN].astype(str)
    unknown = sorted(set(official) - set(SPLITS) - {""})
    if unknown:
        raise SplitError(f"{origin}: column {OFFICIAL_COLUMN!r} has {unknown}; allowed: {SPLITS}")
    blank = official == ""
    if blank.any():
        patients = sorted(rows.loc[blank, "patient_id"].unique())
        raise SplitError(
            f"{origin}: split source 'official' needs an {OFFICIAL_COLUMN} for every labelled "
            f"slice; {int(blank.sum())} slices of {len(patients)} patients have none (first: "
            f"{patients[:5]}); use split source 'random' for a release without one"
        )
    lists = official.groupby(rows["patient_id"]).agg(lambda v: set(v))
    split = lists.map(lambda on: next(name for name in STRICTER_FIRST if name in on))
    conflicts = sorted(lists.index[lists.map(len) > 1])
    report: dict[str, Any] = {"source": "official", "conflict_rule": CONFLICT_RULE}
    report["conflicting_patients"] = len(conflicts)
    report["conflict_examples"] = {p: sorted(lists[p]) for p in conflicts[:10]}
    if conflicts:
        log.warning(
            "%s: %d patient(s) are on several official split lists (first: %s); %s",
            origin,
            len(conflicts),
            conflicts[:5],
            CONFLICT_RULE,
        )
    rng = np.random.default_rng(seed)
    for name, fraction in (("val", val), ("test", test)):
        if (split == name).any():
            report[name] = "official"
            continue
        train = split.index[split == "train"]
        carved = _carve(strata.reindex(train), fraction, rng)
        split[carved] = name
        report[name] = f"carved from the official train part: {len(carved)} patients"
        log.info(
            "%s: no official %s split; %d patients carved from train", origin, name, len(carved)
        )
    for name in SPLITS:
        if not (split == name).any():
            raise SplitError(f"{origin}: the official split leaves no {name} patients")
    return split.rename("split").reindex(strata.index), report


def make_partition(
    meta: pd.DataFrame,
    labels: pd.DataFrame,
    task: dict,
    data_name: str = "<data>",
    labels_name: str = "<labels>",
) -> pd.DataFrame:
    """Join labels to the HDF5 metadata and partition the labelled slices.

    ``meta`` is :func:`medssl.datasets.hdf5.read_meta`'s frame (index = HDF5 row);
    ``labels`` holds ``task['labels_key']`` and ``task['column']``. The names
    are only used in error messages.
    """
    key = task.get("labels_key", "sop_uid")
    spec = task_type_spec(task["type"])
    split_cfg = {**DEFAULT_SPLIT, **(task.get("split") or {})}
    source = look_up("split source", split_cfg["source"], SPLIT_SOURCES)
    columns = _join_columns(meta, labels, task, key, data_name, labels_name)
    extra = [OFFICIAL_COLUMN] if source == "official" else []
    if extra and OFFICIAL_COLUMN not in labels.columns:
        raise SplitError(
            f"{labels_name}: split source 'official' needs column {OFFICIAL_COLUMN!r}; "
            f"columns are {list(labels.columns)}"
        )
    rows, joined = _labelled_rows(
        meta, labels, task, key, [*columns, *extra], data_name, labels_name
    )
    encode = LABEL_ENCODERS[spec.label_encoding]
    rows["label"], rows["label_name"] = encode(joined, task, labels_name)
    targets = None
    if spec.label_encoding == "bits":
        targets = multilabel_targets(joined, task, labels_name)
    if targets is not None:
        rows[TARGETS_COLUMN] = targets.to_numpy()
    strata = patient_strata(rows, task["type"])
    val, test, seed = float(split_cfg["val"]), float(split_cfg["test"]), int(split_cfg["seed"])
    if source == "official":
        rows[OFFICIAL_COLUMN] = joined[OFFICIAL_COLUMN].fillna("").to_numpy()
        splits, report = official_splits(rows, strata, val, test, seed, labels_name)
    else:
        splits = assign_splits(strata, val, test, seed)
        report = {"source": "random", "val": val, "test": test}
    report["seed"] = seed
    rows["split"] = rows["patient_id"].map(splits)
    rows["stratum"] = rows["patient_id"].map(strata).astype(np.int64)
    kept = [*PARTITION_COLUMNS, *([TARGETS_COLUMN] if targets is not None else [])]
    partition = rows[kept].sort_values("index").reset_index(drop=True)
    counts = partition.drop_duplicates("patient_id")["split"].value_counts()
    report["patients"] = {name: int(counts.get(name, 0)) for name in SPLITS}
    partition.attrs["split"] = report  # for the sidecar: how the split was made
    log.info(
        "task %s: %d slices of %d patients; patients per split %s",
        task.get("name"),
        len(partition),
        len(strata),
        {name: int(counts.get(name, 0)) for name in SPLITS},
    )
    return partition


def _join_columns(
    meta: pd.DataFrame,
    labels: pd.DataFrame,
    task: dict,
    key: str,
    data_name: str,
    labels_name: str,
) -> list[str]:
    """The task's label columns, once the metadata has the key and patient columns
    and the label table has the key and the label columns."""
    for name in (key, "patient_id"):
        if name not in meta.columns:
            raise SplitError(
                f"{data_name}: metadata has no column {name!r}; has {list(meta.columns)}"
            )
    columns = label_columns(task)
    for name in (key, *columns):
        if name not in labels.columns:
            raise SplitError(
                f"{labels_name}: no column {name!r}; columns are {list(labels.columns)}"
            )
    return columns


def _labelled_rows(
    meta: pd.DataFrame,
    labels: pd.DataFrame,
    task: dict,
    key: str,
    columns: list[str],
    data_name: str,
    labels_name: str,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The slices that have a label (index, patient_id, key) and their label rows.

    Slices without a label are skipped (and counted in the log); label keys
    that match no slice are an error unless the task's ``unmatched_labels`` is
    ``warn``, because they usually mean a wrong ``labels_key``.
    """
    rows = pd.DataFrame(
        {
            "index": np.arange(len(meta), dtype=np.int64),
            "patient_id": meta["patient_id"].astype(str),
        }
    )
    rows["key"] = meta[key].astype(str).to_numpy()
    label_of = labels.set_index(labels[key].astype(str))[columns]
    if label_of.index.duplicated().any():
        raise SplitError(f"{labels_name}: duplicated {key!r} values in the label table")
    # Filter before mapping so integer labels keep their dtype (no NaN-induced floats).
    unlabelled = ~rows["key"].isin(label_of.index)
    if unlabelled.any():
        log.info(
            "%s: %d of %d slices have no label in %s; skipped",
            data_name,
            int(unlabelled.sum()),
            len(rows),
            labels_name,
        )
    unused = ~label_of.index.isin(rows["key"])
    if unused.any():
        keys = sorted(label_of.index[unused])
        message = (
            f"{labels_name}: {len(keys)} of {len(label_of)} {key!r} values match no slice of "
            f"{data_name} (first: {keys[:5]})"
        )
        if task.get("unmatched_labels", "error") == "error":
            raise SplitError(
                message + "; check labels_key, or set the task's unmatched_labels: warn "
                "when the table also lists images that were not converted"
            )
        log.warning("%s", message)
    rows = rows.loc[~unlabelled].reset_index(drop=True)
    if rows.empty:
        raise SplitError(f"{labels_name}: no {key!r} value matches a slice of {data_name}")
    return rows, label_of.loc[rows["key"]].reset_index(drop=True)


def partition_files(
    data: str | Path, labels: str | Path, task: Any, official: str | Path | None = None
) -> pd.DataFrame:
    """The partition of the dataset ``data`` for ``task``, with labels from ``labels``:
    a label table, or the mask file of a task type whose labels are masks.

    ``official``: a table with ``sop_uid`` and ``official_split`` (the dataset's
    label table), where the split source is ``official`` and ``labels`` is a
    mask file, which has no split of its own.
    """
    if not isinstance(task, dict) or "type" not in task:
        raise SplitError(f"the task must be a JSON object with 'type', got {task!r}")
    is_official = (task.get("split") or {}).get("source", "random") == "official"
    extra = (OFFICIAL_COLUMN,) if is_official else ()
    if task_type_spec(task["type"]).labels_from_masks:
        # The labels of a segmentation task are its mask file: foreground per slice.
        task = {**task, "labels_key": "sop_uid"}
        table = mask_labels(labels, data)
        if is_official:
            if official is None:
                raise SplitError(
                    f"task {task.get('name')!r}: split source 'official' of a segmentation "
                    "task needs the dataset's label table with official_split (--official-splits)"
                )
            splits = read_label_table(official, "sop_uid", [], extra)
            table = table.merge(splits, on="sop_uid", how="left")
            table[OFFICIAL_COLUMN] = table[OFFICIAL_COLUMN].fillna("")
    else:
        key = task.get("labels_key", "sop_uid")
        table = read_label_table(labels, key, label_columns(task), extra)
    return make_partition(read_meta(data), table, task, str(data), str(labels))


def read_partition(path: str | Path) -> pd.DataFrame:
    """Read a partition CSV with the dtypes its writer meant (patient ids stay text)."""
    frame = pd.read_csv(
        path, dtype={"patient_id": str, "label_name": str, "split": str, TARGETS_COLUMN: str}
    )
    missing = [c for c in PARTITION_COLUMNS if c not in frame.columns]
    if missing:
        raise SplitError(f"{path}: not a partition file, missing columns {missing}")
    return frame


# ---------------------------------------------------------------------------- subsets


def make_subsets(partition: pd.DataFrame, seed: int) -> pd.DataFrame:
    """A random rank for every training patient inside its stratum.

    Patients are sorted by id before ranking, so the ranks depend only on the
    set of training patients and ``seed``. One file serves every fraction:
    taking the lowest ranks is what makes the subsets nested.
    """
    train = partition.loc[partition["split"] == "train", ["patient_id", "stratum"]]
    patients = train.drop_duplicates()
    if patients["patient_id"].duplicated().any():
        raise SplitError("partition: a training patient appears in two strata")
    rng = np.random.default_rng(seed)
    parts = []
    for stratum in sorted(patients["stratum"].unique()):
        ids = sorted(patients.loc[patients["stratum"] == stratum, "patient_id"].astype(str))
        parts.append(
            pd.DataFrame({"patient_id": ids, "stratum": stratum, "rank": rng.permutation(len(ids))})
        )
    if not parts:
        raise SplitError("partition has no training patients")
    subsets = pd.concat(parts, ignore_index=True)
    subsets = subsets.astype({"stratum": np.int64, "rank": np.int64})
    return subsets.sort_values(["stratum", "rank"]).reset_index(drop=True)


def read_subsets(path: str | Path) -> pd.DataFrame:
    """Read a subsets CSV (patient ids stay text)."""
    frame = pd.read_csv(path, dtype={"patient_id": str})
    missing = [c for c in SUBSET_COLUMNS if c not in frame.columns]
    if missing:
        raise SplitError(f"{path}: not a subsets file, missing columns {missing}")
    return frame


def select_training(partition: pd.DataFrame, subsets: pd.DataFrame, fraction: float) -> np.ndarray:
    """HDF5 indices of the training slices for ``fraction`` (sorted).

    A training patient is in the subset when its rank is below
    ``max(1, round(fraction * n_stratum))`` (halves round up), so every stratum
    keeps at least one patient and smaller fractions are subsets of larger ones.
    """
    if not 0 < fraction <= 1:
        raise SplitError(f"fraction {fraction} must be in (0, 1]")
    train = partition.loc[partition["split"] == "train"]
    train_ids = set(train["patient_id"].astype(str))
    ranked_ids = set(subsets["patient_id"].astype(str))
    if train_ids != ranked_ids:
        raise SplitError(
            "subsets do not match the partition's training patients "
            f"({len(train_ids - ranked_ids)} unranked, "
            f"{len(ranked_ids - train_ids)} not in train); regenerate them from this partition"
        )
    n_stratum = subsets.groupby("stratum")["patient_id"].transform("size")
    keep = [max(1, round_half_up(fraction * n)) for n in n_stratum]
    chosen = set(
        subsets.loc[subsets["rank"].to_numpy() < np.asarray(keep), "patient_id"].astype(str)
    )
    mask = train["patient_id"].astype(str).isin(chosen)
    return np.sort(train.loc[mask, "index"].to_numpy(dtype=np.int64))
