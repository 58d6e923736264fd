"""SIIM-ACR's relative run-length encoding of pneumothorax masks.

``train-rle.csv`` holds one row per annotated region: ``ImageId`` (the SOP
Instance UID) and ``EncodedPixels``, a list of ``start length`` pairs where
each ``start`` counts from the end of the previous run (from pixel 0 for the
first), over the 1024x1024 image flattened column by column (the challenge's
``mask_functions`` transpose). ``-1`` means no pneumothorax; several rows of
one image are a union.

Written here because no library the project uses reads this variant (COCO's
and Kaggle's usual RLE count from the image start, not from the last run).
"""

from __future__ import annotations

import numpy as np

from medssl.datasets.maskfile import MaskError

EMPTY = "-1"


def decode_rle(encoded: str, height: int, width: int, origin: str = "<rle>") -> np.ndarray:
    """The (height, width) boolean mask of one ``EncodedPixels`` value.

    ``origin`` (e.g. ``train-rle.csv, ImageId 1.2.3``) leads every error message.
    """
    text = str(encoded).strip()
    mask = np.zeros(height * width, dtype=bool)
    if text == EMPTY:
        return mask.reshape((height, width), order="F")
    try:
        values = np.array(text.split(), dtype=np.int64)
    except ValueError:
        raise MaskError(
            f"{origin}: EncodedPixels is not a list of integers: {text[:40]!r}"
        ) from None
    if len(values) == 0 or len(values) % 2:
        raise MaskError(
            f"{origin}: EncodedPixels has {len(values)} values; it needs (start, length) pairs"
        )
    offsets, lengths = values[0::2], values[1::2]
    if (offsets < 0).any() or (lengths <= 0).any():
        raise MaskError(f"{origin}: EncodedPixels has a negative start or a non-positive length")
    # start_i = sum(offsets[:i+1]) + sum(lengths[:i]): each start is relative to the last run's end
    starts = np.cumsum(offsets) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ends = starts + lengths
    if ends[-1] > height * width:
        raise MaskError(
            f"{origin}: a run ends at pixel {int(ends[-1])}, past the end of the "
            f"{height}x{width} image ({height * width} pixels)"
        )
    change = np.zeros(height * width + 1, dtype=np.int64)
    np.add.at(change, starts, 1)
    np.add.at(change, ends, -1)
    mask[:] = np.cumsum(change[:-1]) > 0
    return mask.reshape((height, width), order="F")


def encode_rle(mask: np.ndarray) -> str:
    """The ``EncodedPixels`` text of a 2-D mask (``-1`` when it is empty)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F").astype(np.int8)
    edges = np.diff(np.concatenate([[0], flat, [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if not len(starts):
        return EMPTY
    previous_ends = np.concatenate([[0], ends[:-1]])
    pairs = np.column_stack([starts - previous_ends, ends - starts]).ravel()
    return " ".join(str(int(v)) for v in pairs)
