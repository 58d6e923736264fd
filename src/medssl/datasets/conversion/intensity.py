"""Intensity policies: how HU become stored values, and stored values model input.

The policy is a setting (``intensity.policy``), so each one is a class in
:data:`INTENSITY_POLICIES`; the writer and the workers only use the common
interface (channels, dtype, scale, :meth:`Intensity.apply`) and never ask
which policy they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from medssl.core.registry import Registry, look_up

#: Every key of the ``intensity`` settings section and its default. The
#: pipeline default is one soft-tissue/lung window; ``dtype`` only applies to ``hu``.
INTENSITY_DEFAULTS: dict[str, Any] = {
    "policy": "window",
    "windows": [{"center": -300, "width": 1600}],
    "dtype": "int16",
}


class Intensity:
    """The common interface of the policies; :meth:`from_settings` picks one by name."""

    policy: ClassVar[str] = ""

    @classmethod
    def from_settings(cls, spec: dict[str, Any]) -> Intensity:
        """Validate the ``intensity`` settings section; an unknown policy names the known ones."""
        policy = spec.get("policy", INTENSITY_DEFAULTS["policy"])
        return INTENSITY_POLICIES[policy].parse(spec)

    @classmethod
    def parse(cls, spec: dict[str, Any]) -> Intensity:
        """This policy's instance for a settings section whose ``policy`` names it."""
        return cls()

    @property
    def n_channels(self) -> int:
        return 1

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def scale(self) -> float:
        """8-bit policies feed 0..1 to the model."""
        return 1.0 / 255.0

    @property
    def offset(self) -> float:
        return 0.0

    @property
    def background(self) -> float:
        """The stored value of the padding around a slice smaller than the grid."""
        return 0.0

    #: Whether the policy takes HU (DICOM, NIfTI) or stored integer pixels (images, npz).
    takes_hu: ClassVar[bool] = True

    def channels(self) -> list[dict[str, Any]]:
        """The ``channels`` attribute: what each stored channel means."""
        raise NotImplementedError

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """(n, H, W) HU (int32 when exact, else float) -> (n, C, H, W) stored values."""
        raise NotImplementedError


#: HU of air: the padding of the ``hu`` policy.
AIR_HU = -1024.0


def _as_int16(hu: np.ndarray) -> np.ndarray:
    """HU rounded and stored as int16 (values outside int16 clipped)."""
    if hu.dtype == np.int16:  # exact HU that fit: nothing to do
        return hu
    out = hu if hu.dtype.kind in "iu" else np.rint(hu)
    # np.clip costs more than the rest of the slice's path; CT values
    # are almost never outside int16, so check first.
    if out.min() < -32768 or out.max() > 32767:
        out = np.clip(out, -32768, 32767)
    return out.astype(np.int16)


HU_DTYPES: Registry[Callable[[np.ndarray], np.ndarray]] = Registry(
    "intensity.dtype of policy hu",
    {"int16": _as_int16, "float16": lambda hu: hu.astype(np.float16)},
)
"""The stored dtypes of raw HU, and how HU are cast to each."""


def _exact_float(hu: np.ndarray) -> np.ndarray:
    """Integer HU as float64 (exact); the 8-bit policies round from float64."""
    return hu.astype(np.float64) if hu.dtype.kind in "iu" else hu


@dataclass(frozen=True)
class HUIntensity(Intensity):
    """Raw HU as int16 or float16: nothing lost, the model sees HU / 1000."""

    policy: ClassVar[str] = "hu"
    dtype: str = INTENSITY_DEFAULTS["dtype"]

    @classmethod
    def parse(cls, spec: dict[str, Any]) -> HUIntensity:
        dtype = spec.get("dtype", INTENSITY_DEFAULTS["dtype"])
        return cls(str(look_up(HU_DTYPES.kind, dtype, HU_DTYPES.names())))

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def scale(self) -> float:
        """HU/1000: air -1, water 0, bone about 1."""
        return 1.0 / 1000.0

    @property
    def background(self) -> float:
        """Air."""
        return AIR_HU

    def channels(self) -> list[dict[str, Any]]:
        return [{"hu": self.dtype}]

    def apply(self, hu: np.ndarray) -> np.ndarray:
        return HU_DTYPES[self.dtype](hu)[:, None]


@dataclass(frozen=True)
class WindowIntensity(Intensity):
    """One uint8 channel per HU window (center, width): the usual CT display."""

    policy: ClassVar[str] = "window"
    windows: tuple[tuple[float, float], ...] = ()

    @classmethod
    def parse(cls, spec: dict[str, Any]) -> WindowIntensity:
        windows = spec.get("windows") or INTENSITY_DEFAULTS["windows"]
        parsed = []
        for window in windows:
            center, width = float(window["center"]), float(window["width"])
            if width <= 0:
                raise ValueError(f"intensity window width must be positive, got {width}")
            parsed.append((center, width))
        return cls(tuple(parsed))

    @property
    def n_channels(self) -> int:
        return len(self.windows)

    def channels(self) -> list[dict[str, Any]]:
        return [{"window": [c, w]} for c, w in self.windows]

    def apply(self, hu: np.ndarray) -> np.ndarray:
        hu = _exact_float(hu)
        planes = []
        for center, width in self.windows:
            low = center - width / 2
            scaled = (np.clip(hu, low, low + width) - low) / width * 255.0
            planes.append(np.rint(scaled).astype(np.uint8))
        return np.stack(planes, axis=1)


@dataclass(frozen=True)
class MinMaxIntensity(Intensity):
    """Each slice's own range stretched to 0..255 (for inputs whose values are not HU)."""

    policy: ClassVar[str] = "minmax"

    def channels(self) -> list[dict[str, Any]]:
        return [{"minmax": "per_slice"}]

    def apply(self, hu: np.ndarray) -> np.ndarray:
        hu = _exact_float(hu)
        low = hu.min(axis=(1, 2), keepdims=True)
        span = hu.max(axis=(1, 2), keepdims=True) - low
        scaled = np.where(span > 0, (hu - low) / np.where(span > 0, span, 1.0), 0.0) * 255.0
        return np.rint(scaled).astype(np.uint8)[:, None]


@dataclass(frozen=True)
class ScaleIntensity(Intensity):
    """Stored integer pixels (PNG, JPEG, npz) kept as they are, 8 or 16 bits per
    channel; the model sees them divided by the largest value of the bit depth.

    ``bits`` and ``planes`` are the dataset's (16 when any image has 16 bits; 3
    planes under ``rgb: keep``), set by the source after its header pass; an
    8-bit image in a 16-bit dataset is multiplied by 257 so that 255 stays 1.0.
    """

    policy: ClassVar[str] = "scale"
    takes_hu: ClassVar[bool] = False
    bits: int = 8
    planes: int = 1

    @property
    def n_channels(self) -> int:
        return self.planes

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.bits == 8 else np.uint16)

    @property
    def scale(self) -> float:
        return 1.0 / (2**self.bits - 1)

    def channels(self) -> list[dict[str, Any]]:
        return [{"scale": f"{self.bits}-bit"} for _ in range(self.planes)]

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """(n, H, W) or (n, C, H, W) uint8/uint16 pixels -> (n, C, H, W) stored values."""
        values = hu if hu.ndim == 4 else hu[:, None]
        if values.dtype == np.uint8 and self.bits == 16:
            return values.astype(np.uint16) * np.uint16(257)
        if values.dtype != self.numpy_dtype:
            raise ValueError(f"{values.dtype} pixels do not fit a {self.bits}-bit dataset")
        return values


INTENSITY_POLICIES: Registry[type[Intensity]] = Registry(
    "intensity policy",
    {cls.policy: cls for cls in (HUIntensity, WindowIntensity, MinMaxIntensity, ScaleIntensity)},
)
