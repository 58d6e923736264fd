"""Resampling of slices to the dataset's size: exact area averaging, banded weights.

The conversion resizes the images with it and :mod:`medssl.datasets.mask_sources`
the masks of a segmentation task, so mask pixels sit where image pixels are.
"""

from __future__ import annotations

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
