"""Fine-tuning data within a memory budget: splits held in their stored dtype, or streamed.

A fine-tune reads three lists of HDF5 rows: the training subset of its
fraction and the fixed validation and test splits. :class:`JobData` decides,
per job and against ``finetune.memory_budget_gb``, which of them to hold and
which to stream:

* everything fits: all three are read once (:class:`HeldRows`), in the stored
  dtype (uint8/int16/float16, 1-2 bytes a pixel instead of float32's 4), on
  the run's device;
* only the fixed splits fit: validation and test are held, the training
  subset is streamed (:class:`StreamedRows`);
* neither: every split is streamed, batch by batch, through one DataLoader
  whose workers (``finetune.num_workers``) read whole batches with
  :class:`~medssl.datasets.hdf5.SliceReader` in file order and send stored
  values, pinned when the device is a GPU.

Either way a batch becomes float model input only on the device
(:func:`~medssl.datasets.hdf5.to_model_input`), with the same values and
memory layout, so a held and a streamed run of one seed see identical
batches. The batch order and augmentation are drawn in the training process
from the run's generator, never in a worker, which is what keeps the two
paths' random draws identical.

The estimate behind the choice (:meth:`JobData.plan`) counts the held bytes
(images, segmentation masks, and for a held segmentation split the float
maps its whole-split scoring keeps) plus what the loader has in flight
(prefetched batches in the stored dtype and one float batch on the device);
:attr:`JobData.peak_bytes` records the largest total a job reached.

The seeds of one job (``compute.seeds_per_job``) share one :class:`JobData`:
one loader (one opened file per worker process, workers kept alive across
splits, epochs and seeds) and, when the fixed splits fit the budget, one
read of the validation and test rows, held once for every seed. The
training subsets differ per seed and are read per seed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medssl.core.registry import look_up
from medssl.datasets.hdf5 import IMAGES, SliceReader, open_h5, to_model_input
from medssl.datasets.maskfile import MASKS, open_mask_file

log = logging.getLogger(__name__)

DEFAULT_BUDGET_GB = 2.0
"""``finetune.memory_budget_gb``'s default: pre-training's in-memory limit, for one rule."""

PREFETCH_FACTOR = 2
"""Batches each loader worker reads ahead."""

Batch = tuple[np.ndarray, torch.Tensor, torch.Tensor | None]
"""Positions within the split, float model input (N, C, H, W), float masks (N, 1, H, W) or None."""


class RowsDataset(Dataset):
    """Whole batches of HDF5 rows in the stored dtype: an item is an array of row numbers.

    Items are rows of the file, not positions in a split, so one dataset (and
    one pool of workers) serves every split and every seed of a job. Files
    are opened on first use in each process (h5py handles do not survive
    ``fork``) and stay open for the process's life.
    """

    def __init__(self, path: str | Path, masks: str | Path | None = None) -> None:
        self.path = Path(path)
        self.masks = None if masks is None else Path(masks)
        self._handles: list[h5py.File] = []
        self._readers: tuple[SliceReader, SliceReader | None] | None = None

    def readers(self) -> tuple[SliceReader, SliceReader | None]:
        """The image reader and the mask reader (None without masks) of this process."""
        if self._readers is None:
            images = open_h5(self.path, random_access=True)
            self._handles = [images]
            mask_reader = None
            if self.masks is not None:
                mask_file = open_mask_file(self.masks)
                self._handles.append(mask_file)
                mask_reader = SliceReader(mask_file, MASKS)
            self._readers = (SliceReader(images, IMAGES), mask_reader)
        return self._readers

    def __getitem__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, masks = self.readers()
        stored = torch.from_numpy(images.read_rows(np.asarray(rows, dtype=np.int64)))
        return stored, None if masks is None else torch.from_numpy(masks.read_rows(rows))

    def close(self) -> None:
        """Close this process's files (workers close theirs when they exit)."""
        for handle in self._handles:
            handle.close()
        self._handles, self._readers = [], None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": [], "_readers": None}


class PlannedBatches:
    """The loader's sampler: the row batches of the current pass, set before each pass.

    A persistent DataLoader keeps its sampler object; re-reading this one at
    every ``iter`` lets one set of workers serve passes over different rows.
    """

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass(frozen=True)
class Layout:
    """What one row costs: the stored image and mask bytes, and the scaling to model input."""

    shape: tuple[int, ...]
    image_bytes: int
    mask_bytes: int
    scale: float
    offset: float

    @property
    def pixels(self) -> int:
        return int(np.prod(self.shape[1:]))


def read_layout(path: str | Path, masks: str | Path | None) -> Layout:
    """The row layout of a dataset (and its mask file)."""
    with open_h5(path) as handle:
        images = handle[IMAGES]
        shape = tuple(int(d) for d in images.shape[1:])
        image_bytes = int(np.prod(shape)) * images.dtype.itemsize
        scale, offset = float(images.attrs["scale"]), float(images.attrs["offset"])
    mask_bytes = 0
    if masks is not None:
        with open_mask_file(masks) as handle:
            stored = handle[MASKS]
            mask_bytes = int(np.prod(stored.shape[1:])) * stored.dtype.itemsize
    return Layout(shape, image_bytes, mask_bytes, scale, offset)


def _model_input(stored: torch.Tensor, layout: Layout, device: torch.device) -> torch.Tensor:
    # channels_last: the layout whole-array training always used (~20 % faster on CPU).
    image = to_model_input(stored.to(device, non_blocking=True), layout.scale, layout.offset)
    return image.contiguous(memory_format=torch.channels_last)


def _mask_input(stored: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if stored is None else stored.to(device, non_blocking=True).unsqueeze(1).float()


class HeldRows:
    """One split held on the device in its stored dtype; batches are converted as they are used."""

    held = True

    def __init__(
        self,
        rows: np.ndarray,
        images: torch.Tensor,
        masks: torch.Tensor | None,
        layout: Layout,
        device: torch.device,
    ) -> None:
        self.rows, self.images, self.masks = rows, images, masks
        self.layout, self.device = layout, device

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        masks = 0 if self.masks is None else self.masks.nbytes
        return self.images.nbytes + masks

    def batches(self, positions: Sequence[torch.Tensor | np.ndarray]) -> Iterator[Batch]:
        """The batches at ``positions`` (indices into this split), in that order."""
        for where in positions:
            index = torch.as_tensor(where, device=self.images.device)
            masks = None if self.masks is None else self.masks[index]
            x = _model_input(self.images[index], self.layout, self.device)
            yield np.asarray(where), x, _mask_input(masks, self.device)

    def model_input(self) -> torch.Tensor:
        """The whole split as float model input (builds it: for small splits and tests)."""
        return _model_input(self.images, self.layout, self.device)

    def mask_input(self) -> torch.Tensor | None:
        """The whole split's masks as float (N, 1, H, W), or None without masks."""
        return _mask_input(self.masks, self.device)


class StreamedRows:
    """One split read from the file batch by batch through the job's loader."""

    held = False

    def __init__(self, rows: np.ndarray, job: JobData) -> None:
        self.rows, self.job = rows, job

    nbytes = 0
    """Nothing is held: the loader's batches are counted by :meth:`JobData.in_flight_bytes`."""

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, positions: Sequence[torch.Tensor | np.ndarray]) -> Iterator[Batch]:
        """The batches at ``positions``, read ahead by the loader's workers."""
        wanted = [np.asarray(where, dtype=np.int64) for where in positions]
        loader = self.job.loader()
        loader.sampler.batches = [self.rows[where] for where in wanted]
        for where, (stored, masks) in zip(wanted, loader, strict=True):
            x = _model_input(stored, self.job.layout, self.job.device)
            yield where, x, _mask_input(masks, self.job.device)

    def model_input(self) -> torch.Tensor:
        raise RuntimeError(
            f"a streamed split ({len(self.rows)} rows) has no whole-split tensor: "
            "it exceeds finetune.memory_budget_gb"
        )

    mask_input = model_input


RowSource = HeldRows | StreamedRows


@dataclass(frozen=True)
class Plan:
    """Which splits a run holds, and the bytes the estimate gave."""

    hold_fixed: bool
    hold_train: bool
    held_bytes: int
    in_flight_bytes: int
    """Transient bytes: float batches, and the loader's queue when anything streams."""

    @property
    def total(self) -> int:
        return self.held_bytes + self.in_flight_bytes


DATA_MODES = ("auto", "held", "fixed", "streamed")
"""How :class:`JobData` plans: by the budget, or every split held, val/test only, none."""


class JobData:
    """The data side of one fine-tune job: its file, its loader, its held fixed splits.

    ``budget_gb`` bounds what the job keeps in memory at once (host and device
    together, counted as :class:`Plan` says). ``mode`` ``auto`` chooses the
    plan by the budget; the others force one (for comparisons and benchmarks)
    and are still refused when they exceed the budget. Use as a context manager, or
    call :meth:`close`, to stop the loader's workers and close the files.
    """

    def __init__(
        self,
        path: str | Path,
        masks: str | Path | None,
        device: torch.device,
        budget_gb: float = DEFAULT_BUDGET_GB,
        num_workers: int = 0,
        mode: str = "auto",
    ) -> None:
        if not float(budget_gb) > 0:
            raise ValueError(f"finetune.memory_budget_gb must be > 0, got {budget_gb}")
        if int(num_workers) < 0:
            raise ValueError(f"finetune.num_workers must be >= 0, got {num_workers}")
        self.path, self.masks, self.device = Path(path), masks, torch.device(device)
        self.budget = int(float(budget_gb) * 1024**3)
        self.num_workers = int(num_workers)
        self.mode = look_up("fine-tune data mode", mode, DATA_MODES)
        self.layout = read_layout(path, masks)
        self.dataset = RowsDataset(path, masks)
        self._loader: DataLoader | None = None
        self._fixed: dict[bytes, tuple[HeldRows, HeldRows]] = {}
        self.peak_bytes = 0
        """The largest held + in-flight total the job's plans reached."""
        self.reads: dict[str, int] = {"held_rows": 0}
        """Rows read into held splits (the shared fixed splits count once)."""

    def __enter__(self) -> JobData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the loader's workers, close the files, drop the held fixed splits."""
        if self._loader is not None and self.num_workers > 0:
            iterator = getattr(self._loader, "_iterator", None)
            if iterator is not None:
                iterator._shutdown_workers()
        self._loader = None
        self._fixed.clear()
        self.dataset.close()

    def loader(self) -> DataLoader:
        """The job's one DataLoader (workers start on its first pass and live until close)."""
        if self._loader is None:
            workers = self.num_workers
            self._loader = DataLoader(
                self.dataset,
                sampler=PlannedBatches(),
                batch_size=None,
                num_workers=workers,
                persistent_workers=workers > 0,
                prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
                pin_memory=self.device.type == "cuda",
                # Its own generator: a loader pass must not draw from torch's global RNG,
                # or a streamed run's random state would drift from a held run's.
                generator=torch.Generator(),
            )
        return self._loader

    def row_bytes(self, scored: bool, dense: bool) -> int:
        """Held bytes of one row; a held segmentation split scored whole keeps 2 float maps."""
        extra = 2 * 4 * self.layout.pixels if scored and dense else 0
        return self.layout.image_bytes + self.layout.mask_bytes + extra

    def in_flight_bytes(self, batch: int, dense: bool) -> int:
        """A streamed run's transient bytes: the loader's queue and one float batch."""
        return self.queue_bytes(batch) + self.float_bytes(batch, dense)

    def queue_bytes(self, batch: int) -> int:
        """Stored batches in flight: the prefetched ones, the one in use and its pinned copy."""
        stored = batch * (self.layout.image_bytes + self.layout.mask_bytes)
        return (self.num_workers * PREFETCH_FACTOR + 2) * stored

    def float_bytes(self, batch: int, dense: bool) -> int:
        """One batch as float model input on the device (and a segmentation batch's two maps)."""
        return batch * 4 * self.layout.pixels * (3 if dense else 1)

    def plan(self, sizes: tuple[int, int, int], batch: int, dense: bool) -> Plan:
        """The most the budget can hold: every split, the fixed splits only, or none.

        ``batch`` is the largest batch the run asks for (training or
        evaluation); a split shorter than it makes batches of its own length.
        """
        n_train, n_val, n_test = sizes
        batch = min(batch, max(sizes))
        floats, queue = self.float_bytes(batch, dense), self.queue_bytes(batch)
        fixed = (n_val + n_test) * self.row_bytes(True, dense)
        train = n_train * self.row_bytes(False, dense)
        plans = {
            "held": Plan(True, True, fixed + train, floats),
            "fixed": Plan(True, False, fixed, floats + queue),
            "streamed": Plan(False, False, 0, floats + queue),
        }
        if self.mode == "auto":
            plan = next((p for p in plans.values() if p.total <= self.budget), plans["streamed"])
        else:
            plan = plans[self.mode]
        if plan.total > self.budget:
            raise ValueError(
                f"finetune.memory_budget_gb = {self.budget / 1024**3:.3g} cannot hold the run's "
                f"data ({self.mode}: {plan.total / 1024**2:.1f} MiB at batch {batch} with "
                f"{self.num_workers} workers): raise it or lower batch_size / num_workers"
            )
        self.peak_bytes = max(self.peak_bytes, plan.total)
        return plan

    def hold(self, rows: np.ndarray) -> HeldRows:
        """Read ``rows`` once, in file order, into a held split on the device."""
        images, masks = self.dataset.readers()
        self.reads["held_rows"] += len(rows)
        stored = torch.from_numpy(images.read_rows(rows)).to(self.device)
        held_masks = None if masks is None else torch.from_numpy(masks.read_rows(rows))
        held_masks = None if held_masks is None else held_masks.to(self.device)
        return HeldRows(rows, stored, held_masks, self.layout, self.device)

    def fixed_splits(self, val: np.ndarray, test: np.ndarray) -> tuple[HeldRows, HeldRows]:
        """The held validation and test splits, read on the first call and shared after it."""
        key = np.concatenate([val, [-1], test]).astype(np.int64).tobytes()
        if key not in self._fixed:
            self._fixed[key] = (self.hold(val), self.hold(test))
        return self._fixed[key]

    def sources(
        self, rows: tuple[np.ndarray, np.ndarray, np.ndarray], batch: int, dense: bool
    ) -> tuple[RowSource, RowSource, RowSource]:
        """The train, val and test sources of one run, held or streamed as :meth:`plan` says."""
        train, val, test = (np.asarray(r, dtype=np.int64) for r in rows)
        if self.masks is not None:
            open_mask_file(self.masks, np.concatenate([train, val, test])).close()
        plan = self.plan((len(train), len(val), len(test)), batch, dense)
        mode = "train streamed, val/test held" if plan.hold_fixed else "all streamed"
        log.info(
            "fine-tune data: %s (held %.1f MiB, loader %.1f MiB, budget %.0f MiB)",
            "all held" if plan.hold_train else mode,
            plan.held_bytes / 1024**2,
            plan.in_flight_bytes / 1024**2,
            self.budget / 1024**2,
        )
        if plan.hold_fixed:
            held_val, held_test = self.fixed_splits(val, test)
            trained = self.hold(train) if plan.hold_train else StreamedRows(train, self)
            return trained, held_val, held_test
        return StreamedRows(train, self), StreamedRows(val, self), StreamedRows(test, self)
