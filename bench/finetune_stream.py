"""Fine-tuning data paths: the whole-array read, held splits and streamed batches, one run.

Writes a synthetic dataset of ``--n`` slices (default 100,000) of 224 x 224
uint8 with the conversion's own writer (Blosc, one chunk per slice), then
measures, each configuration in a fresh process so its peak resident memory
is its own:

* ``load_images``: the whole-array read (h5py list indexing, float32) of a
  training subset of ``--subset`` slices, then batches indexed from it;
* ``held``: the same subset held in its stored dtype (:class:`HeldRows`);
* ``streamed``: the same subset, and a ``--large`` subset (default: every
  slice), streamed by the fine-tune loader with 0, 1, ... ``--workers``
  DataLoader workers.

Per configuration: slices/s delivered as float model input (per worker and
in total), time to the first training batch (from opening the data; for the
whole-array and held paths it includes reading the subset), and the peak
resident memory of the process and of its workers.

    python bench/finetune_stream.py                      # 100,000 slices
    python bench/finetune_stream.py --n 20000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from medssl.datasets.conversion.intensity import Intensity  # noqa: E402
from medssl.datasets.conversion.pixels import SeriesResult  # noqa: E402
from medssl.datasets.conversion.writing import write_images  # noqa: E402
from medssl.datasets.hdf5 import load_images  # noqa: E402
from medssl.finetuning.streaming import JobData, StreamedRows  # noqa: E402

WINDOW = {"policy": "window", "windows": [{"center": 40, "width": 400}]}
BLOCK = 2000
"""Slices per written block: the writer's memory stays a block, never the dataset."""


def block(start: int, count: int, size: int, rng: np.random.Generator) -> SeriesResult:
    """``count`` noise slices with the metadata the writer needs (16 slices a series)."""
    images = rng.normal(90, 25, (count, 1, size, size)).clip(0, 255).astype(np.uint8)
    rows = range(start, start + count)
    series = [f"S{row // 16:06d}" for row in rows]
    meta = {
        "patient_id": [f"P{row // 64:05d}" for row in rows],
        "study_uid": series,
        "series_uid": series,
        "sop_uid": [f"1.2.3.{row}" for row in rows],
        "source_file": series,
        "z": [float(row % 16) for row in rows],
        "spacing": [[1.0, 1.0, 1.0]] * count,
        "original_shape": [[size, size]] * count,
        "resized_shape": [[size, size]] * count,
        "pad_offset": [[0, 0]] * count,
        "scale": [[1.0, 1.0]] * count,
    }
    return SeriesResult(images, meta)


def write_dataset(path: Path, n: int, size: int) -> float:
    """The synthetic dataset through :func:`write_images`; returns seconds taken."""
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    blocks = (block(s, min(BLOCK, n - s), size, rng) for s in range(0, n, BLOCK))
    write_images(path, blocks, Intensity.from_settings(WINDOW), (size, size), "blosc", [])
    return time.perf_counter() - started


def batches_of(n_rows: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The first ``steps`` batches of a shuffled epoch, as the training loop draws them."""
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(order, batch))[:steps]


def peak_rss_mib(pid: int | str = "self") -> float:
    """VmHWM of a process: its own peak (``ru_maxrss`` would carry a parent's over exec)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_pids() -> list[int]:
    """Live child processes of this one (the loader's workers)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def measure(args: argparse.Namespace) -> dict:
    """One configuration (in this process): first-batch time, slices/s, peak RSS."""
    rows = np.sort(np.random.default_rng(1).choice(args.n, args.rows, replace=False))
    batches = batches_of(len(rows), args.batch, args.steps, seed=2)
    started = time.perf_counter()
    if args.mode == "load_images":
        images = load_images(args.data, rows)
        stream = ((b, images[b], None) for b in batches)
    else:
        job = JobData(args.data, None, torch.device("cpu"), num_workers=args.workers_now)
        source = job.hold(rows) if args.mode == "held" else StreamedRows(rows, job)
        stream = source.batches(batches)
    delivered, first = 0, None
    for _, x, _ in stream:
        if first is None:
            first = time.perf_counter() - started
            timed_from = time.perf_counter()
        else:
            delivered += len(x)
    seconds = time.perf_counter() - timed_from
    rate = delivered / seconds
    workers_rss = [peak_rss_mib(pid) for pid in worker_pids()]  # before the workers exit
    workers = args.workers_now if args.mode == "streamed" else 0
    return {
        "mode": args.mode,
        "rows": len(rows),
        "workers": workers,
        "slices_per_s": round(rate, 1),
        "slices_per_s_per_worker": round(rate / max(workers, 1), 1),
        "first_batch_s": round(first, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "workers_peak_rss_mib": [round(value, 1) for value in workers_rss],
    }


def child(args: argparse.Namespace, mode: str, rows: int, workers: int) -> dict:
    """:func:`measure` in a fresh interpreter, so each peak RSS is that configuration's."""
    argv = [sys.executable, __file__, "--measure", mode, "--data", str(args.data)]
    argv += ["--n", str(args.n), "--rows", str(rows), "--workers-now", str(workers)]
    argv += ["--batch", str(args.batch), "--steps", str(args.steps)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="slices of the dataset")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--subset", type=int, default=4000, help="rows the whole-array path reads")
    parser.add_argument("--large", type=int, default=None, help="streamed rows (default: all)")
    parser.add_argument("--workers", type=int, default=2, help="largest worker count tried")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="batches timed per configuration")
    parser.add_argument("--root", type=Path, default=None, help="keep the dataset here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers-now", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    if args.measure:
        args.mode = args.measure
        print(json.dumps(measure(args)))
        return
    root = args.root or Path(tempfile.mkdtemp(prefix="finetune_stream_"))
    root.mkdir(parents=True, exist_ok=True)
    args.data = root / f"stream_{args.n}_{args.size}.h5"
    if not args.data.exists():
        seconds = write_dataset(args.data, args.n, args.size)
        print(f"# wrote {args.n} slices of {args.size}x{args.size} uint8 in {seconds:.1f} s")
    size_gb = args.n * args.size**2 / 1024**3
    print(f"# {args.data}: {size_gb:.2f} GB stored, {4 * size_gb:.2f} GB as float32")
    large = args.large or args.n
    configs = [("load_images", args.subset, 0), ("held", args.subset, 0)]
    for rows in (args.subset, large):
        configs += [("streamed", rows, workers) for workers in range(args.workers + 1)]
    for mode, rows, workers in configs:
        print(json.dumps(child(args, mode, rows, workers)))


if __name__ == "__main__":
    main()
