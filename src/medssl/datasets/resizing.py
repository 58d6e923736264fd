"""Resampling of slices to the dataset's grid: exact area averaging, banded weights,
and the per-row geometry (resize, then pad or crop) that puts slices of
different shapes into one array.

The conversion moves the images with :func:`to_stored_grid` and
:mod:`medssl.datasets.mask_sources` the masks of a segmentation task, so mask
pixels sit where image pixels are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights resampling one axis.

    Shrinking averages the exact input area under each output pixel (no
    aliasing of noise or thin structures, also for non-integer ratios);
    enlarging interpolates linearly (pixel centres aligned, like
    ``align_corners=False``).
    """
    if n_in == n_out:
        return np.eye(n_in)
    weights = np.zeros((n_out, n_in))
    if n_out < n_in:
        scale = n_in / n_out
        low = np.arange(n_out)[:, None] * scale
        left = np.arange(n_in)[None, :]
        overlap = np.minimum(low + scale, left + 1) - np.maximum(low, left)
        return np.clip(overlap, 0.0, None) / scale
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    j0 = np.floor(src).astype(int)
    frac = src - j0
    j1 = np.minimum(j0 + 1, n_in - 1)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, j0), 1 - frac)
    np.add.at(weights, (rows, j1), frac)
    return weights


def _resample_axis(images: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """Apply (n_out, n_in) resampling weights along ``axis`` of a (n, H, W) stack.

    The weights are banded (a few inputs per output), so a gather and a short
    weighted sum replace the dense product. That avoids BLAS, whose thread pool
    turned this into the slowest step of the conversion on a busy small machine.
    """
    width = max(1, int((weights > 0).sum(axis=1).max()))
    index = np.argsort(weights <= 0, axis=1, kind="stable")[:, :width]
    index = np.sort(index, axis=1)
    taps = np.take_along_axis(weights, index, axis=1)  # (n_out, width)
    shape = [1, 1, 1]
    shape[axis] = weights.shape[0]
    out = np.take(images, index[:, 0], axis=axis) * taps[:, 0].reshape(shape)
    for k in range(1, width):
        out += np.take(images, index[:, k], axis=axis) * taps[:, k].reshape(shape)
    return out


def resize(images: np.ndarray, size: int | None) -> np.ndarray:
    """Resample (n, H, W) to (n, size, size); ``None`` keeps the native size."""
    if size is None:
        return images
    height, width = images.shape[1:]
    if (height, width) == (size, size):
        return images
    cols = _resample_axis(images, resample_matrix(width, size), axis=2)
    return _resample_axis(cols, resample_matrix(height, size), axis=1)


def resize_to(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resample (n, H, W) to (n, height, width) by :func:`resample_matrix` per axis.

    An axis that keeps its length is not touched, so integer HU stay integer
    (and exact) when only the other axis, or neither, changes.
    """
    out = images
    if out.shape[2] != width:
        out = _resample_axis(out, resample_matrix(out.shape[2], width), axis=2)
    if out.shape[1] != height:
        out = _resample_axis(out, resample_matrix(out.shape[1], height), axis=1)
    return out


#: The ``geometry`` setting: how slices of different shapes share one array.
GEOMETRIES = ("pad", "crop", "resize", "reject")


@dataclass(frozen=True)
class Geometry:
    """Where one native slice lands in ``/images``: resampled to ``resized`` (rows,
    columns), then placed with its top-left pixel at ``offset`` of the stored
    ``stored`` grid (a negative offset crops; the uncovered rest is background).

    The conversion writes these per row as ``/meta/original_shape``,
    ``/meta/resized_shape``, ``/meta/pad_offset`` and ``/meta/scale``, so any
    array on the native grid (a mask) can be moved to the stored grid by
    :func:`to_stored_grid` exactly as the image was.
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]
    stored: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """Stored pixels per native pixel, per axis."""
        return (self.resized[0] / self.original[0], self.resized[1] / self.original[1])

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], row: int, stored: tuple[int, int]) -> Geometry:
        """A row's geometry from the ``/meta`` columns (arrays or data-frame columns)."""
        return cls(
            tuple(int(v) for v in meta["original_shape"][row]),  # type: ignore[arg-type]
            tuple(int(v) for v in meta["resized_shape"][row]),  # type: ignore[arg-type]
            tuple(int(v) for v in meta["pad_offset"][row]),  # type: ignore[arg-type]
            (int(stored[0]), int(stored[1])),
        )


#: The ``fit`` setting: with ``image_size``, how a non-square slice fills the square.
FITS = ("pad", "crop")


@dataclass(frozen=True)
class Grid:
    """The dataset's stored grid and the rule that maps each native shape onto it.

    At native size (``image_size`` null) the ``geometry`` decides: ``pad``
    centres every slice on the largest height and width of the dataset (the
    native pixels untouched), ``crop`` centre-crops to the smallest,
    ``resize`` resamples every slice to the largest, and ``reject`` keeps only
    the slices of the most common shape (the others are rejected before this
    grid is used). With ``image_size`` S the grid is S x S and ``fit`` keeps
    the aspect ratio: ``pad`` scales the long side to S and pads the short
    one, ``crop`` scales the short side to S and centre-crops the long one;
    geometry ``resize`` or ``reject`` squash to S x S instead (the behaviour
    before aspect ratios were kept). With ``target_spacing`` (row, column mm)
    every slice is first resampled to that pixel spacing.
    """

    geometry: str
    stored: tuple[int, int]
    image_size: int | None = None
    target_spacing: tuple[float, float] | None = None
    fit: str = "pad"

    @classmethod
    def plan(
        cls,
        shapes: Iterable[tuple[tuple[int, int], tuple[float, float] | None, int]],
        geometry: str,
        image_size: int | None,
        target_spacing: Sequence[float] | None = None,
        fit: str = "pad",
    ) -> Grid:
        """The grid for a dataset given (native shape, pixel spacing, number of slices)
        of each group of slices (a series, a volume, an image)."""
        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
        if fit not in FITS:
            raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
        target = None
        if target_spacing is not None:
            target = (float(target_spacing[0]), float(target_spacing[1]))
        if image_size is not None:
            return cls(geometry, (image_size, image_size), image_size, target, fit)
        weights: Counter[tuple[int, int]] = Counter()
        for shape, spacing, count in shapes:
            weights[_spaced_shape(shape, spacing, target)] += count
        if not weights:
            return cls(geometry, (1, 1), None, target, fit)
        if geometry in ("pad", "resize"):
            stored = (max(h for h, _ in weights), max(w for _, w in weights))
        elif geometry == "crop":
            stored = (min(h for h, _ in weights), min(w for _, w in weights))
        else:  # reject: the most common shape (ties to the smallest)
            best = max(weights.values())
            stored = min(s for s, c in weights.items() if c == best)
        return cls(geometry, stored, None, target, fit)

    def place(self, shape: tuple[int, int], spacing: tuple[float, float] | None) -> Geometry:
        """The geometry of one native slice of ``shape`` and pixel ``spacing``."""
        spaced = _spaced_shape(shape, spacing, self.target_spacing)
        height, width = self.stored
        if self.geometry in ("resize", "reject"):
            resized = (height, width)  # squashed (reject: only the grid's shape is left)
        elif self.image_size is None:
            resized = spaced
        else:
            side = max(spaced) if self.fit == "pad" else min(spaced)
            factor = self.image_size / side
            resized = (max(1, round(spaced[0] * factor)), max(1, round(spaced[1] * factor)))
            if self.fit == "pad":
                resized = (min(resized[0], height), min(resized[1], width))
        offset = ((height - resized[0]) // 2, (width - resized[1]) // 2)
        return Geometry((int(shape[0]), int(shape[1])), resized, offset, self.stored)


def _spaced_shape(
    shape: tuple[int, int],
    spacing: tuple[float, float] | None,
    target: tuple[float, float] | None,
) -> tuple[int, int]:
    """The shape of a slice resampled from ``spacing`` to ``target`` mm (unchanged without)."""
    if target is None:
        return (int(shape[0]), int(shape[1]))
    if spacing is None or not all(np.isfinite(spacing)):
        raise ValueError("target_spacing needs the pixel spacing of every slice, which is unknown")
    return (
        max(1, round(shape[0] * spacing[0] / target[0])),
        max(1, round(shape[1] * spacing[1] / target[1])),
    )


#: How :func:`to_stored_grid` resamples: ``linear`` for images (area average when
#: shrinking), ``area`` for masks (area average, then >= 0.5), ``nearest`` for labels.
RESAMPLING = ("linear", "area", "nearest")


def to_stored_grid(
    native: np.ndarray,
    geometry: Geometry,
    resampling: str = "linear",
    fill: float = 0,
) -> np.ndarray:
    """Map a native-grid array (H, W) or (n, H, W) onto the stored grid of ``geometry``.

    The one transform of the dataset: the conversion stores images with it
    (``linear``), and a mask on the native grid follows its image pixel for pixel
    with ``area`` (the fraction of foreground under each stored pixel, kept
    where >= 0.5) or ``nearest`` (label values copied, for multi-class masks).
    The pixels outside the resampled slice get ``fill``. A mask source gets a
    row's geometry from ``/meta`` with :meth:`Geometry.from_meta`.
    """
    if resampling not in RESAMPLING:
        raise ValueError(f"resampling must be one of {', '.join(RESAMPLING)}, got {resampling!r}")
    stack = native[None] if native.ndim == 2 else native
    if tuple(stack.shape[1:]) != geometry.original:
        raise ValueError(
            f"array of shape {tuple(stack.shape[1:])} does not match the slice's native shape "
            f"{geometry.original}"
        )
    if resampling == "nearest":
        rows = _nearest(geometry.original[0], geometry.resized[0])
        cols = _nearest(geometry.original[1], geometry.resized[1])
        resampled = stack[:, rows][:, :, cols]
    elif resampling == "area":
        resampled = (resize_to(stack.astype(np.float32), *geometry.resized) >= 0.5).astype(
            stack.dtype
        )
    else:
        resampled = resize_to(stack, *geometry.resized)
    placed = place_on_grid(resampled, geometry, fill)
    return placed[0] if native.ndim == 2 else placed


def _nearest(n_in: int, n_out: int) -> np.ndarray:
    """Index of the input pixel whose centre is nearest each output pixel's centre."""
    centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    return np.clip(np.rint(centres), 0, n_in - 1).astype(int)


def place_on_grid(resampled: np.ndarray, geometry: Geometry, fill: float = 0) -> np.ndarray:
    """Put (n, *geometry.resized) at ``geometry.offset`` of a ``fill``-valued stored grid
    (cropping where the offset is negative); a no-op when the shapes already agree."""
    height, width = geometry.stored
    if tuple(resampled.shape[-2:]) == (height, width) and geometry.offset == (0, 0):
        return resampled
    out = np.full((*resampled.shape[:-2], height, width), fill, dtype=resampled.dtype)
    top, left = geometry.offset
    rh, rw = resampled.shape[-2:]
    src_r, dst_r = max(0, -top), max(0, top)
    src_c, dst_c = max(0, -left), max(0, left)
    n_r = min(rh - src_r, height - dst_r)
    n_c = min(rw - src_c, width - dst_c)
    out[..., dst_r : dst_r + n_r, dst_c : dst_c + n_c] = resampled[
        ..., src_r : src_r + n_r, src_c : src_c + n_c
    ]
    return out
