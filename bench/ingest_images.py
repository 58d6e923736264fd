"""Ingest throughput of image files: medssl's ``images`` source against a plain loop.

One run, one machine: a temporary folder of ``--n8`` 8-bit and ``--n16`` 16-bit
grey PNGs of ``--size`` x ``--size`` pixels (fixed seed; smooth content, so the
files compress like real radiographs rather than like noise), then, interleaved
over ``--repeats`` rounds so that a change of machine load hits every contender:

- ``medssl`` :func:`medssl.datasets.sources.convert_images` with 1 and 2 worker
  processes (native size, Blosc, the default ``scale`` policy), whole run
  including the header pass and the HDF5 write;
- ``loop``: one process opening each file with Pillow, ``np.asarray`` and
  filling one preallocated, memory-mapped stack per bit depth (the least a
  conversion must do; in memory the full set would not fit).

``--distinct`` contents per bit depth are encoded once and written to many
files, since encoding the full set takes longer than measuring it; decoding
costs the same per file either way.

The table gives slices/s (median over the rounds) and each contender's ratio to
the loop. The PNGs were just written, so they are in the page cache for all.

    python bench/ingest_images.py [--n8 10000 --n16 2000 --size 1024 --repeats 3 --distinct 200]
"""

from __future__ import annotations

import argparse
import io
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


def make_folder(root: Path, n8: int, n16: int, size: int, seed: int, distinct: int) -> pd.DataFrame:
    """Write the PNGs and return their manifest (one patient per 10 images).

    ``distinct`` contents per bit depth (at most), each encoded once and its bytes
    written to every ``distinct``-th file: a decoder does the same work per file
    whatever the repetition, and encoding 12,000 distinct 1024^2 PNGs alone takes
    over an hour on a 2-core machine.
    """
    rng = np.random.default_rng(seed)
    encoded: dict[int, list[bytes]] = {}
    for bits, count in ((8, n8), (16, n16)):
        encoded[bits] = []
        for _ in range(min(distinct, count)):
            buffer = io.BytesIO()
            Image.fromarray(smooth_image(rng, size, bits)).save(buffer, "PNG", compress_level=6)
            encoded[bits].append(buffer.getvalue())
    rows = []
    for k in range(n8 + n16):
        bits = 8 if k < n8 else 16
        index = k if k < n8 else k - n8
        name = f"img{bits}_{k:06d}.png"
        (root / name).write_bytes(encoded[bits][index % len(encoded[bits])])
        rows.append({"file": name, "patient_id": f"p{k // 10:05d}", "label": k % 2})
    return pd.DataFrame(rows)


def plain_loop(root: Path, manifest: pd.DataFrame, work: Path) -> int:
    """Pillow open + numpy into one preallocated stack per bit depth: the baseline.

    The stacks are memory-mapped files in ``work``: 12,000 slices of 1024^2 are
    14 GB, more than the memory such a machine can spare, and a conversion must
    put its output on disk too. The bit depth of a file is in its name, so the
    loop opens each file once.
    """
    stacks: dict[str, np.memmap] = {}
    filled: dict[str, int] = {}
    for name in manifest["file"]:
        depth = name.split("_", 1)[0]
        with Image.open(root / name) as image:
            array = np.asarray(image)
        if depth not in stacks:
            total = int(manifest["file"].str.startswith(depth + "_").sum())
            stacks[depth] = np.lib.format.open_memmap(
                work / f"loop_{depth}.npy", "w+", array.dtype, (total, *array.shape)
            )
            filled[depth] = 0
        stacks[depth][filled[depth]] = array
        filled[depth] += 1
    for stack in stacks.values():
        stack.flush()
    del stacks
    return sum(filled.values())


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
    parser.add_argument("--distinct", type=int, default=200, help="contents per bit depth")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        work = Path(tmp)
        root = work / "png"
        root.mkdir()
        start = time.perf_counter()
        manifest = make_folder(root, args.n8, args.n16, args.size, args.seed, args.distinct)
        mb = sum(p.stat().st_size for p in root.iterdir()) / 2**20
        print(
            f"{len(manifest)} PNGs ({args.n8} 8-bit, {args.n16} 16-bit, {args.size}^2), "
            f"{mb:.0f} MB, written in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        contenders = {
            "loop (Pillow + numpy, 1 process)": lambda: plain_loop(root, manifest, work),
            "medssl images, 1 worker": lambda: run_medssl(root, manifest, work, 1),
            "medssl images, 2 workers": lambda: run_medssl(root, manifest, work, 2),
        }
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        for round_ in range(args.repeats):
            for name, func in contenders.items():
                began = time.perf_counter()
                n = func()
                rates[name].append(n / (time.perf_counter() - began))
                for output in [*work.glob("out*"), *work.glob("loop_*.npy")]:
                    output.unlink()  # 12,000 slices of 1024^2 are 14 GB per copy
                print(f"round {round_ + 1} {name}: {rates[name][-1]:.1f} slices/s", flush=True)
        base = statistics.median(rates["loop (Pillow + numpy, 1 process)"])
        print(f"\nload average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
        print(f"{'contender':40s} {'slices/s':>9s} {'ratio':>6s}")
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"{name:40s} {rate:9.1f} {rate / base:6.2f}")


if __name__ == "__main__":
    main()
