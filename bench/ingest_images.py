"""Ingest throughput of image files: medssl's ``images`` source against a plain loop.

One run, one machine: a temporary folder of ``--n8`` 8-bit and ``--n16`` 16-bit
grey PNGs of ``--size`` x ``--size`` pixels (fixed seed; smooth content, so the
files compress like real radiographs rather than like noise), then, interleaved
over ``--repeats`` rounds so that a change of machine load hits every contender:

- ``medssl`` :func:`medssl.datasets.sources.convert_images` with 1 and 2 worker
  processes (native size, Blosc, the default ``scale`` policy), whole run
  including the header pass and the HDF5 write;
- ``loop``: one process opening each file with Pillow, ``np.asarray`` and
  stacking everything into one array (the least a conversion must do).

The table gives slices/s (median over the rounds) and each contender's ratio to
the loop. The PNGs were just written, so they are in the page cache for all.

    python bench/ingest_images.py [--n8 10000 --n16 2000 --size 1024 --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medssl.datasets.sources import convert_images


def smooth_image(rng: np.random.Generator, size: int, bits: int) -> np.ndarray:
    """Smooth content (a 12 x 12 random field upsampled bicubically by Pillow) plus
    mild noise, scaled to the bit depth."""
    coarse = Image.fromarray(rng.random((12, 12)).astype(np.float32), mode="F")
    field = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    field = (field - field.min()) / max(np.ptp(field), 1e-9)
    field = 0.97 * field + 0.03 * rng.random((size, size))
    top = 2**bits - 1
    return np.rint(field * top).astype(np.uint8 if bits == 8 else np.uint16)


def make_folder(root: Path, n8: int, n16: int, size: int, seed: int) -> pd.DataFrame:
    """Write the PNGs and return their manifest (one patient per 10 images)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n8 + n16):
        bits = 8 if k < n8 else 16
        name = f"img{bits}_{k:06d}.png"
        Image.fromarray(smooth_image(rng, size, bits)).save(root / name, compress_level=6)
        rows.append({"file": name, "patient_id": f"p{k // 10:05d}", "label": k % 2})
    return pd.DataFrame(rows)


def plain_loop(root: Path, manifest: pd.DataFrame) -> int:
    """Pillow open + numpy + one stacked array: the baseline."""
    arrays = []
    for name in manifest["file"]:
        with Image.open(root / name) as image:
            arrays.append(np.asarray(image))
    stacked = np.stack([a.astype(np.uint16) for a in arrays])
    return len(stacked)


def run_medssl(root: Path, manifest: pd.DataFrame, work: Path, threads: int) -> int:
    summary = convert_images(
        root,
        manifest,
        work / f"out{threads}.h5",
        work / f"out{threads}.rejects.csv",
        {"image_size": None},
        threads=threads,
    )
    return int(summary["converted"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n8", type=int, default=10_000)
    parser.add_argument("--n16", type=int, default=2_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        work = Path(tmp)
        root = work / "png"
        root.mkdir()
        start = time.perf_counter()
        manifest = make_folder(root, args.n8, args.n16, args.size, args.seed)
        mb = sum(p.stat().st_size for p in root.iterdir()) / 2**20
        print(
            f"{len(manifest)} PNGs ({args.n8} 8-bit, {args.n16} 16-bit, {args.size}^2), "
            f"{mb:.0f} MB, written in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        contenders = {
            "loop (Pillow + numpy, 1 process)": lambda: plain_loop(root, manifest),
            "medssl images, 1 worker": lambda: run_medssl(root, manifest, work, 1),
            "medssl images, 2 workers": lambda: run_medssl(root, manifest, work, 2),
        }
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        for round_ in range(args.repeats):
            for name, func in contenders.items():
                began = time.perf_counter()
                n = func()
                rates[name].append(n / (time.perf_counter() - began))
                print(f"round {round_ + 1} {name}: {rates[name][-1]:.1f} slices/s", flush=True)
        base = statistics.median(rates["loop (Pillow + numpy, 1 process)"])
        print(f"\nload average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
        print(f"{'contender':40s} {'slices/s':>9s} {'ratio':>6s}")
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"{name:40s} {rate:9.1f} {rate / base:6.2f}")


if __name__ == "__main__":
    main()
