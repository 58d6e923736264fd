"""Conversion and read throughput of :mod:`medssl.convert`, against dcm2niix and pydicom.

One run, one machine, one synthetic cohort (``medssl.synth`` at 512 x 512):

1. conversion slices/s with 1 and 2 workers (raw HU, native size), and
   ``dcm2niix`` converting the same folder in the same run (if installed);
2. random single-slice reads from the HDF5 versus ``pydicom.dcmread`` +
   ``pixel_array`` of the same slices, as a ratio;
3. the HDF5 image compression filters (LZF as used, none, and Blosc/LZ4 when
   ``hdf5plugin`` is importable): size, write time and random read rate.

The DICOM files were just written, so they are in the page cache for every
contender alike; figures are warm-cache throughput, not cold-disk.

    python bench/convert_bench.py --work /tmp/convbench [--patients 5 --slices 100 --copies 5]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from medssl import convert, synth

HU_NATIVE = {"intensity": {"policy": "hu"}, "image_size": None}


def _timed(label: str, func, *args, **kwargs):  # noqa: ANN001, ANN202 - thin timing helper
    start = time.perf_counter()
    result = func(*args, **kwargs)
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s", flush=True)
    return result, seconds


def bench_convert(dicom: Path, work: Path) -> int:
    """Slices/s for 1 and 2 workers and for dcm2niix; returns the slice count."""
    n = 0
    for threads in (1, 2):
        out = work / f"convert_t{threads}.h5"
        summary, seconds = _timed(
            f"medssl.convert threads={threads}",
            convert.convert,
            dicom,
            out,
            work / f"convert_t{threads}.rejects.csv",
            HU_NATIVE,
            threads,
        )
        n = summary["converted"]
        print(f"  {n} slices -> {n / seconds:.0f} slices/s", flush=True)
    exe = shutil.which("dcm2niix")
    if exe is None:
        print("dcm2niix not installed: skipped")
        return n
    nifti = work / "nifti"
    shutil.rmtree(nifti, ignore_errors=True)
    nifti.mkdir()
    # -z n: uncompressed NIfTI, the fair match for LZF-on-the-fly; -b n: no JSON sidecar.
    _, seconds = _timed(
        "dcm2niix",
        subprocess.run,
        [exe, "-z", "n", "-b", "n", "-o", str(nifti), str(dicom)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(f"  {n} slices (same series) -> {n / seconds:.0f} slices/s", flush=True)
    return n


def bench_reads(h5: Path, dicom: Path, count: int, seed: int = 0) -> None:
    """Random single-slice reads: HDF5 row versus one DICOM file decoded by pydicom."""
    with h5py.File(h5) as handle:
        files = handle["meta/source_file"].asstr()[...]
        count = min(count, len(files))
        rows = np.random.default_rng(seed).choice(len(files), size=count, replace=False)
        images = handle["images"]
        start = time.perf_counter()
        for row in rows:
            images[int(row)]
        h5_rate = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for row in rows:
        pixels = pydicom.dcmread(dicom / files[row]).pixel_array
        assert pixels.ndim == 2
    dcm_rate = count / (time.perf_counter() - start)
    print(
        f"random reads, 1 process: HDF5 {h5_rate:.0f} slices/s, pydicom {dcm_rate:.0f} "
        f"slices/s, ratio {h5_rate / dcm_rate:.1f}x",
        flush=True,
    )


class _DicomSlices:
    """The per-file alternative to :class:`medssl.data.SliceDataset`: one dcmread per item."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int):  # noqa: ANN204 - torch tensor
        import torch

        ds = pydicom.dcmread(self.files[item])
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        return torch.from_numpy(hu / 1000.0)[None]


def bench_loader(h5: Path, dicom: Path, count: int, workers: int, seed: int = 0) -> None:
    """Training-style reads: shuffled DataLoader with workers, HDF5 versus DICOM files."""
    from torch.utils.data import DataLoader, Subset

    from medssl.data import SliceDataset

    with h5py.File(h5) as handle:
        files = [dicom / f for f in handle["meta/source_file"].asstr()[...]]
    rows = np.random.default_rng(seed).choice(
        len(files), size=min(count, len(files)), replace=False
    )
    rates = {}
    for name, dataset in (("HDF5", SliceDataset(h5)), ("pydicom", _DicomSlices(files))):
        loader = DataLoader(
            Subset(dataset, rows.tolist()), batch_size=32, num_workers=workers, shuffle=False
        )
        start = time.perf_counter()
        n = sum(len(batch) for batch in loader)
        rates[name] = n / (time.perf_counter() - start)
    print(
        f"DataLoader, {workers} workers, batch 32, random slices: HDF5 {rates['HDF5']:.0f} "
        f"slices/s, pydicom {rates['pydicom']:.0f} slices/s, "
        f"ratio {rates['HDF5'] / rates['pydicom']:.1f}x",
        flush=True,
    )


def _filters() -> dict[str, dict]:
    filters: dict[str, dict] = {"lzf": {"compression": "lzf"}, "none": {}}
    try:
        import hdf5plugin
    except ImportError:
        print("hdf5plugin not installed: Blosc skipped")
    else:
        filters["blosc-lz4"] = dict(hdf5plugin.Blosc(cname="lz4", shuffle=hdf5plugin.Blosc.SHUFFLE))
    return filters


def bench_compression(h5: Path, count: int, reads: int, seed: int = 0) -> None:
    """Size, write and random-read speed of the same slices under each filter."""
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
            write = time.perf_counter() - start
            with h5py.File(path) as handle:
                images = handle["images"]
                start = time.perf_counter()
                for row in rows:
                    images[int(row)]
                rate = reads / (time.perf_counter() - start)
            size = path.stat().st_size / stack.nbytes
            print(
                f"filter {name}: size {size:.2f} of raw, write {len(stack) / write:.0f} slices/s, "
                f"random read {rate:.0f} slices/s",
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
    bench_reads(args.work / "convert_t1.h5", dicom, args.reads)
    bench_loader(args.work / "convert_t1.h5", dicom, 4 * args.reads, args.workers)
    bench_compression(args.work / "convert_t1.h5", 500, args.reads)


if __name__ == "__main__":
    main()
