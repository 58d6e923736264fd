"""Conversion and read throughput of :mod:`medssl.convert` against dcm2niix and pydicom.

One run, one machine, one synthetic cohort (``medssl.datasets.synthetic`` at 512 x 512):

1. conversion slices/s with 1 and 2 workers (raw HU, native size), and
   ``dcm2niix`` converting the same folder in the same run (if installed);
2. random single-slice reads from the HDF5 (:class:`medssl.datasets.hdf5.SliceReader`)
   versus ``pydicom.dcmread`` + ``pixel_array`` + rescale of the same slices,
   in one process, as a ratio;
3. a shuffled ``DataLoader`` with workers over the HDF5 (whole batches in the
   stored dtype, and per-slice float32) and over the DICOM files, in steady
   state (worker start-up excluded), with the rate per worker;
4. the HDF5 image compression filters: size, write and random read rate.

The DICOM files were just written, so they are in the page cache for every
contender alike; figures are warm-cache throughput, not cold-disk.

    python bench/convert_bench.py --work /tmp/convbench [--patients 5 --slices 100 --copies 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from medssl.datasets import conversion as convert
from medssl.datasets import synthetic as synth

HU_NATIVE = {"intensity": {"policy": "hu"}, "image_size": None}
TRAINING = {
    "intensity": {"policy": "window", "windows": [{"center": -600, "width": 1500}]},
    "image_size": 224,
}


def _timed(label: str, func, *args, **kwargs):  # noqa: ANN001, ANN202 - thin timing helper
    start = time.perf_counter()
    result = func(*args, **kwargs)
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s", flush=True)
    return result, seconds


def _load() -> str:
    """The machine's load average, printed with the figures: they depend on it."""
    return "load average " + ", ".join(f"{v:.1f}" for v in os.getloadavg())


def bench_convert(dicom: Path, work: Path) -> int:
    """Slices/s for 1 and 2 workers and for dcm2niix; returns the slice count."""
    n = 0
    rates = {}
    for threads in (1, 2):
        out = work / f"convert_t{threads}.h5"
        out.unlink(missing_ok=True)  # renaming over an old file makes ext4 flush it first
        summary, seconds = _timed(
            f"medssl.datasets.conversion threads={threads} ({_load()})",
            convert.convert,
            dicom,
            out,
            work / f"convert_t{threads}.rejects.csv",
            HU_NATIVE,
            threads,
        )
        n = summary["converted"]
        rates[threads] = n / seconds
        print(f"  {n} slices -> {rates[threads]:.0f} slices/s", flush=True)
    exe = shutil.which("dcm2niix")
    if exe is None:
        print("dcm2niix not installed: skipped")
        return n
    nifti = work / "nifti"
    shutil.rmtree(nifti, ignore_errors=True)
    nifti.mkdir()
    # -z n: uncompressed NIfTI (its fastest output); -b n: no JSON sidecar.
    _, seconds = _timed(
        f"dcm2niix ({_load()})",
        subprocess.run,
        [exe, "-z", "n", "-b", "n", "-o", str(nifti), str(dicom)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    reference = n / seconds
    print(f"  {n} slices (same series) -> {reference:.0f} slices/s", flush=True)
    for threads, rate in rates.items():
        print(
            f"  medssl.datasets.conversion {threads} worker(s) / dcm2niix = {rate / reference:.2f}"
        )
    return n


def _dicom_hu(path: Path) -> np.ndarray:
    """The per-file reference: dcmread, pixel_array, rescale to float32 HU."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def bench_reads(h5: Path, dicom: Path, count: int, seed: int = 0) -> None:
    """Random single-slice reads in one process: HDF5 versus one DICOM file per slice."""
    from medssl.datasets.hdf5 import SliceReader, open_h5

    with h5py.File(h5) as handle:
        files = handle["meta/source_file"].asstr()[...]
    count = min(count, len(files))
    rows = np.random.default_rng(seed).choice(len(files), size=count, replace=False)
    with open_h5(h5, random_access=True) as handle:
        reader = SliceReader(handle)
        out = np.empty(reader.shape, reader.dtype)
        start = time.perf_counter()
        for row in rows:
            reader.read(int(row), out)
        h5_rate = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for row in rows:
        _dicom_hu(dicom / files[row])
    dcm_rate = count / (time.perf_counter() - start)
    print(
        f"random reads, 1 process ({_load()}): HDF5 {h5_rate:.0f} slices/s, pydicom "
        f"{dcm_rate:.0f} slices/s, ratio {h5_rate / dcm_rate:.1f}x",
        flush=True,
    )


class _DicomSlices:
    """The per-file alternative to :class:`medssl.datasets.hdf5.SliceDataset`: a dcmread an item."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int):  # noqa: ANN204 - torch tensor
        import torch

        return torch.from_numpy(_dicom_hu(self.files[item]) / 1000.0)[None]


def _steady_rate(loader, batches: int) -> float:  # noqa: ANN001 - a DataLoader
    """Slices/s delivered after the first batch (worker start-up is paid once per
    training), at most ``batches`` batches of one epoch.

    Batches in the stored dtype are timed as delivered: their conversion to
    float (:func:`medssl.datasets.hdf5.to_model_input`) runs on the GPU in training,
    and on this CPU it would time the main process, not the loader.
    """
    iterator = iter(loader)
    next(iterator)
    batches = min(batches, len(loader) - 1)
    start = time.perf_counter()
    n = sum(len(next(iterator)) for _ in range(batches))
    return n / (time.perf_counter() - start)


def bench_loader(h5: Path, dicom: Path, batches: int, workers: int, seed: int = 0) -> None:
    """Training-style reads: shuffled DataLoader with workers, HDF5 versus DICOM files."""
    import torch
    from torch.utils.data import DataLoader

    from medssl.datasets.hdf5 import SliceBatchDataset, SliceDataset, batch_loader

    with h5py.File(h5) as handle:
        files = [dicom / f for f in handle["meta/source_file"].asstr()[...]]
    batch = 32
    generator = torch.Generator().manual_seed(seed)
    loaders = {
        "HDF5 batches (SliceBatchDataset, stored dtype)": batch_loader(
            SliceBatchDataset(h5), batch, num_workers=workers, seed=seed
        ),
        "HDF5 per slice (SliceDataset, float32)": DataLoader(
            SliceDataset(h5), batch, shuffle=True, num_workers=workers, generator=generator
        ),
        "pydicom per file (float32)": DataLoader(
            _DicomSlices(files), batch, shuffle=True, num_workers=workers, generator=generator
        ),
    }
    rates = {}
    for name, loader in loaders.items():
        n = batches if "pydicom" not in name else max(4, batches // 4)
        rates[name] = _steady_rate(loader, n)
        print(
            f"DataLoader {workers} workers, batch {batch}, random slices, {name} ({_load()}): "
            f"{rates[name]:.0f} slices/s = {rates[name] / workers:.0f} per worker",
            flush=True,
        )
    reference = rates["pydicom per file (float32)"]
    for name, rate in rates.items():
        print(f"  {name} / pydicom = {rate / reference:.1f}x; x16 = {16 * rate / workers:.0f}/s")


def _filters() -> dict[str, dict]:
    """The filters compared: medssl's choices (lzf, none, blosc = Blosc LZ4 byte
    shuffle) and the Blosc variants that trade speed for size."""
    import hdf5plugin

    blosc = hdf5plugin.Blosc
    return {
        **{name: convert.COMPRESSION[name] for name in ("none", "lzf", "blosc")},
        "blosc-lz4-bitshuffle": dict(blosc(cname="lz4", clevel=5, shuffle=blosc.BITSHUFFLE)),
        "blosc-zstd1": dict(blosc(cname="zstd", clevel=1, shuffle=blosc.SHUFFLE)),
    }


def bench_compression(h5: Path, count: int, reads: int, seed: int = 0) -> None:
    """Size, write and random-read speed of the same slices under each filter."""
    from medssl.datasets.hdf5 import SliceReader, open_h5

    with h5py.File(h5) as handle:
        stack = handle["images"][:count]
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(stack), size=reads)
    with tempfile.TemporaryDirectory(dir=h5.parent) as tmp:
        for name, options in _filters().items():
            path = Path(tmp) / f"{name}.h5"
            start = time.perf_counter()
            with h5py.File(path, "w") as out:
                out.create_dataset("images", data=stack, chunks=(1, *stack.shape[1:]), **options)
                out.create_group("meta")
            write = time.perf_counter() - start
            with open_h5(path, random_access=True) as handle:
                reader = SliceReader(handle)
                buffer = np.empty(reader.shape, reader.dtype)
                start = time.perf_counter()
                for row in rows:
                    reader.read(int(row), buffer)
                rate = reads / (time.perf_counter() - start)
            size = path.stat().st_size / stack.nbytes
            print(
                f"filter {name}: size {size:.2f} of raw, write {len(stack) / write:.0f} slices/s, "
                f"random read {rate:.0f} slices/s ({_load()})",
                flush=True,
            )


def replicate(source: Path, target: Path, copies: int) -> None:
    """``copies`` copies of a cohort with fresh UIDs and patient ids: distinct series.

    Synthesising 512 x 512 phantoms costs far more than converting them, so a
    large cohort is built from a smaller one; every copy is a separate
    patient/study/series to every converter.
    """
    for k in range(copies):
        for path in sorted(source.rglob("*.dcm")):
            ds = pydicom.dcmread(path)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                setattr(ds, keyword, generate_uid(entropy_srcs=[str(k), ds.get(keyword)]))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID = f"{ds.PatientID}-c{k}"
            out = target / f"copy{k}" / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (GBs)")
    parser.add_argument("--patients", type=int, default=25)
    parser.add_argument("--series-per-patient", type=int, default=2)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--reads", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument(
        "--reads-only", action="store_true", help="reuse the converted HDF5; only read benchmarks"
    )
    parser.add_argument(
        "--copies", type=int, default=1, help="replicate the synthetic cohort (fresh UIDs)"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dicom = args.work / "dicom"
    if not dicom.exists():
        settings = {
            "patients": args.patients,
            "series_per_patient": args.series_per_patient,
            "slices": args.slices,
            "matrix": args.matrix,
        }
        _timed("synthesize", synth.synthesize, dicom, args.work / "labels.csv", settings)
    if args.copies > 1:
        many = args.work / f"dicom_x{args.copies}"
        if not many.exists():
            _timed("replicate", replicate, dicom, many, args.copies)
        dicom = many
    if not args.reads_only:
        bench_convert(dicom, args.work)
    native = args.work / "convert_t1.h5"
    # The format training reads: a lung window to uint8 at the network's input
    # size, converted from the same DICOM files (the first copy is enough).
    base = args.work / "dicom"
    training = args.work / "training_u8.h5"
    if not training.exists():
        _timed(
            f"medssl.datasets.conversion {TRAINING}",
            convert.convert,
            base,
            training,
            args.work / "training_u8.rejects.csv",
            TRAINING,
            2,
        )
    for label, h5, root in (("native int16 HU", native, dicom), ("training uint8", training, base)):
        print(f"--- reads: {label} ({h5.name})", flush=True)
        bench_reads(h5, root, args.reads)
        bench_loader(h5, root, args.reads // 8, args.workers)
    bench_compression(native, 500, args.reads)


if __name__ == "__main__":
    main()
