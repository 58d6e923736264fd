"""CT-appropriate multi-view augmentation for self-supervised pre-training.

A view is made from a float slice ``(C, H, W)`` in model-input units by

1. a random resized crop (area fraction ``crop_scale``, aspect ratio
   ``crop_ratio``) resampled back to ``H x W``, a horizontal flip and a small
   rotation (``rotate_degrees``), fused into ONE affine resampling;
2. intensity-window jitter ``x * a + b`` instead of colour jitter: CT has no
   hue or saturation, but the display window (level/width) a radiologist or a
   scanner protocol picks varies, which is an affine change of intensity;
3. gamma on the range-normalised view, Gaussian blur and Gaussian noise.

Why not a chain of ``monai.transforms`` (RandSpatialCrop + Resize + RandFlip +
RandRotate + RandGaussianNoise + ...)? Measured on this project's CPU for one
64x64 slice, each MONAI array transform costs 0.4-3 ms (MetaTensor tracking and
per-call affine bookkeeping; RandRotate alone is 3 ms), about 9 ms per view,
which starves even a small ResNet. The fused torch implementation below, applied
to a whole batch at once (see :class:`MultiViewDataset`), measured 5,000-9,000
views/s on one core for batches of 64 slices of 64x64 (1,000-1,600 views/s when
called one slice at a time, where per-call overhead dominates). The classes still implement
MONAI's ``Randomizable``/``Transform`` interface (a local ``self.R`` random
state and ``set_random_state``), so they compose with MONAI pipelines and are
reseeded by ``monai.data.DataLoader``'s worker initialisation as well as by
:func:`seed_worker` here.

Intensity offsets and noise are fractions of the view's per-channel
standard deviation, so the same defaults hold whether model input is HU/1000,
a [0, 1] window or a min-max normalised slice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Randomizable, Transform
from torch.utils.data import Dataset, get_worker_info

from medssl.core.registry import look_up
from medssl.core.seeding import worker_init

DEFAULT_AUGMENT: dict[str, Any] = {
    "crop_scale": [0.2, 1.0],
    "crop_ratio": [3 / 4, 4 / 3],
    "flip": True,
    "rotate_degrees": 10.0,
    "intensity_jitter": 0.3,
    "gamma": 0.3,
    "blur_probability": 0.3,
    "blur_sigma": [0.1, 1.5],
    "noise_std": 0.02,
}
"""Defaults. The keys are the config schema's ``augment`` keys (``crop_ratio`` and
``blur_sigma`` are code-level extras). Per view: horizontal flip with
probability 0.5 when ``flip``; rotation angle uniform in +-``rotate_degrees``;
``intensity_jitter`` j draws a in [1 - j, 1 + j] and b in [-j, j] standard
deviations; ``gamma`` g draws the exponent log-uniformly in [e^-g, e^g];
blur with probability ``blur_probability``, sigma uniform in ``blur_sigma``
pixels; noise standard deviation uniform in [0, ``noise_std``] standard
deviations. A strength of 0 switches its operation off."""


def augment_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults overridden by ``settings``; unknown keys are an error, not ignored.

    A misspelt key silently falling back to a default would make a benchmark
    row describe an augmentation that never ran.
    """
    settings = dict(settings or {})
    for key in sorted(set(settings) - set(DEFAULT_AUGMENT)):
        look_up("augment setting", key, DEFAULT_AUGMENT)
    merged = {**DEFAULT_AUGMENT, **settings}
    low, high = merged["crop_scale"]
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"augment.crop_scale must satisfy 0 < low <= high <= 1, got {[low, high]}")
    jitter = merged["intensity_jitter"]
    if not 0.0 <= jitter < 1.0:
        # a = 1 - j must stay positive: a = 0 would flatten a view to a constant.
        raise ValueError(f"augment.intensity_jitter must be in [0, 1), got {jitter}")
    for key in ("rotate_degrees", "gamma", "noise_std"):
        if merged[key] < 0:
            raise ValueError(f"augment.{key} must be >= 0, got {merged[key]}")
    return merged


class CTAugment(Randomizable, Transform):
    """Random views of ``(C, H, W)`` or ``(N, C, H, W)`` float tensors, same shape and dtype out.

    A batch gets independent parameters per sample but one vectorised pass
    (one ``grid_sample``, one grouped convolution): on CPU the per-call
    overhead of small tensor ops, not arithmetic, dominates for 64x64 slices,
    so augmenting a whole batch at once is several times faster. All random
    numbers come from ``self.R`` (a NumPy ``RandomState``), so
    :meth:`set_random_state` makes the sequence of views reproducible.
    """

    def __init__(self, settings: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        self.settings = augment_settings(settings)
        # Randomizable.R is a class attribute shared by every instance until set.
        self.set_random_state(seed)
        self._grids: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _crop_boxes(self, n: int, height: int, width: int) -> np.ndarray:
        """(n, 4) crops as centre x, centre y, width, height in pixels.

        Area fraction uniform in ``crop_scale``, log aspect ratio uniform in
        ``crop_ratio`` (SimCLR's random resized crop); a sample whose ten
        candidate boxes all fall outside the slice uses the whole slice, so no
        setting can loop forever.
        """
        low, high = self.settings["crop_scale"]
        r_low, r_high = self.settings["crop_ratio"]
        tries = 10
        area = height * width * self.R.uniform(low, high, size=(n, tries))
        ratio = np.exp(self.R.uniform(math.log(r_low), math.log(r_high), size=(n, tries)))
        crop_w = np.sqrt(area * ratio)
        crop_h = np.sqrt(area / ratio)
        fits = (crop_w <= width) & (crop_h <= height)
        first = fits.argmax(axis=1)
        rows = np.arange(n)
        crop_w = np.where(fits.any(axis=1), crop_w[rows, first], float(width))
        crop_h = np.where(fits.any(axis=1), crop_h[rows, first], float(height))
        centre_x = crop_w / 2 + self.R.random_sample(n) * (width - crop_w)
        centre_y = crop_h / 2 + self.R.random_sample(n) * (height - crop_h)
        return np.stack([centre_x, centre_y, crop_w, crop_h], axis=1)

    def _axes(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Output pixel centres along x (1, 1, W, 1) and y (1, H, 1, 1) in ``grid_sample`` units."""
        key = (height, width)
        if key not in self._grids:
            xs = (torch.arange(width, dtype=torch.float32) + 0.5) * (2 / width) - 1
            ys = (torch.arange(height, dtype=torch.float32) + 0.5) * (2 / height) - 1
            self._grids[key] = (xs.view(1, 1, width, 1), ys.view(1, height, 1, 1))
        return self._grids[key]

    def _geometry(self, batch: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        """Crop, flip and rotate each sample with one bilinear ``grid_sample``.

        The output is ``size`` (height, width), the input's own size when None;
        the map below is in normalised coordinates, so a smaller output samples
        the same crop on a coarser grid (SwAV's low-resolution local crops).

        Output coordinates (u, v) in [-1, 1] map to input pixels as
        ``centre + R(angle) @ (flip * u * w / 2, v * h / 2)``, written in
        ``grid_sample``'s normalised coordinates (``align_corners=False``).
        Border padding repeats edge pixels, which for CT is air, rather than
        inventing a frame at value 0 of whatever units the input uses.
        """
        n, _, height, width = batch.shape
        s = self.settings
        boxes = self._crop_boxes(n, height, width)
        centre_x, centre_y, crop_w, crop_h = boxes.T
        flip = np.where(self.R.random_sample(n) < (0.5 if s["flip"] else 0.0), -1.0, 1.0)
        limit = math.radians(s["rotate_degrees"])
        angle = self.R.uniform(-limit, limit, size=n)
        cos, sin = np.cos(angle), np.sin(angle)
        theta = np.stack(
            [
                flip * crop_w / width * cos,
                -crop_h / width * sin,
                2 * centre_x / width - 1,
                flip * crop_w / height * sin,
                crop_h / height * cos,
                2 * centre_y / height - 1,
            ],
            axis=1,
        ).reshape(n, 2, 3)
        theta = torch.from_numpy(theta.astype(np.float32))
        xs, ys = self._axes(*(size or (height, width)))
        # The map is affine, so the grid is an outer sum of a per-column and a
        # per-row term: one broadcast add instead of a (H*W x 3) matmul per sample.
        along_x = xs * theta[:, None, None, :, 0]
        along_y = ys * theta[:, None, None, :, 1] + theta[:, None, None, :, 2]
        grid = along_x + along_y
        return F.grid_sample(
            batch, grid, mode="bilinear", padding_mode="border", align_corners=False
        )

    def _blur(self, batch: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
        """Separable Gaussian blur with a per-sample sigma (0 = unchanged), per channel.

        One kernel radius (from the largest sigma) for the batch, so all
        samples and channels go through one grouped convolution.
        """
        n, channels, height, width = batch.shape
        radius = min(math.ceil(3 * float(sigma.max())), (min(height, width) - 1) // 2)
        if radius < 1:
            return batch
        offsets = np.arange(-radius, radius + 1, dtype=np.float64)
        safe = np.maximum(sigma, 1e-3)[:, None]
        kernel = np.exp(-(offsets[None, :] ** 2) / (2 * safe**2))
        kernel /= kernel.sum(axis=1, keepdims=True)
        kernel[sigma <= 0] = (offsets == 0).astype(np.float64)
        kernel = torch.from_numpy(np.repeat(kernel, channels, axis=0).astype(np.float32))
        flat = batch.reshape(1, n * channels, height, width)
        flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
        flat = F.conv2d(flat, kernel.view(n * channels, 1, 1, -1), groups=n * channels)
        flat = F.conv2d(flat, kernel.view(n * channels, 1, -1, 1), groups=n * channels)
        return flat.view(n, channels, height, width)

    def __call__(self, image: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Random views of ``image`` ((C, H, W) or (N, C, H, W)); the input is not modified.

        ``size`` (height, width) resamples the views to another resolution.
        """
        if image.ndim not in (3, 4):
            raise ValueError(f"expected (C, H, W) or (N, C, H, W), got shape {tuple(image.shape)}")
        single = image.ndim == 3
        dtype = image.dtype
        batch = image.unsqueeze(0) if single else image
        n = batch.shape[0]
        s = self.settings
        view = self._geometry(batch.float(), size)
        spread = _channel_std(view)

        def per_sample(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values.astype(np.float32)).view(n, 1, 1, 1)

        jitter = s["intensity_jitter"]
        gain = self.R.uniform(1 - jitter, 1 + jitter, n)
        offset = self.R.uniform(-jitter, jitter, n)
        view = view * per_sample(gain) + per_sample(offset) * spread
        spread = spread * per_sample(gain)

        gamma = np.exp(self.R.uniform(-s["gamma"], s["gamma"], size=n))
        if s["gamma"] > 0:
            low = view.flatten(2).amin(dim=2)[:, :, None, None]
            span = view.flatten(2).amax(dim=2)[:, :, None, None] - low
            unit = ((view - low) / span.clamp_min(1e-6)).clamp(0.0, 1.0)
            # exp(g * log u) is pow(u, g) (log 0 = -inf gives 0) at half pow's cost on CPU.
            view = torch.exp(torch.log(unit) * per_sample(gamma)) * span + low

        use_blur = self.R.random_sample(n) < s["blur_probability"]
        sigma = np.where(use_blur, self.R.uniform(*s["blur_sigma"], size=n), 0.0)
        if use_blur.any():
            view = self._blur(view, sigma)

        level = self.R.uniform(0.0, s["noise_std"], size=n)
        if s["noise_std"] > 0:
            # torch's normal sampler is ~10x faster than RandomState's; seeding it
            # from self.R keeps the stream reproducible under set_random_state.
            generator = torch.Generator().manual_seed(int(self.R.randint(2**31)))
            noise = torch.randn(view.shape, generator=generator)
            view = view + noise * (spread * per_sample(level))
        view = view.to(dtype)
        return view.squeeze(0) if single else view


class MultiView(Randomizable, Transform):
    """``n_views`` independent random views of an image or a batch, as a list."""

    def __init__(
        self, settings: Mapping[str, Any] | None = None, n_views: int = 2, seed: int = 0
    ) -> None:
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        self.n_views = n_views
        self.augment = CTAugment(settings, seed)
        self.set_random_state(seed)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> MultiView:
        """Reseed this transform and the view augmentation it drives."""
        super().set_random_state(seed, state)
        if hasattr(self, "augment"):
            self.augment.set_random_state(int(self.R.randint(2**31)))
        return self

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Views drawn one after another from one random stream, so they differ."""
        return [self.augment(image) for _ in range(self.n_views)]


class MultiCrop(Randomizable, Transform):
    """SwAV's multi-crop (Caron et al., 2020): ``n_global`` full-size views, ``n_local`` small ones.

    Local crops cover a small area (``local_crop_scale``, the official
    0.05-0.14 of the image) and are resampled to ``local_size`` times the
    input's height and width (96/224 in the paper), so many extra views cost
    little compute. Global views use ``global_crop_scale`` (official
    0.14-1.0) instead of ``augment.crop_scale``; every other augmentation
    setting is shared. The list holds global views first, which is the order
    :class:`medssl.pretraining.methods.swav.SwAV` expects.
    """

    def __init__(
        self,
        settings: Mapping[str, Any] | None = None,
        *,
        n_global: int = 2,
        n_local: int = 6,
        local_size: float = 96 / 224,
        global_crop_scale: Sequence[float] = (0.14, 1.0),
        local_crop_scale: Sequence[float] = (0.05, 0.14),
        seed: int = 0,
    ) -> None:
        if n_global < 1 or n_local < 0:
            raise ValueError(
                f"multi-crop needs n_global >= 1 and n_local >= 0, got {n_global}, {n_local}"
            )
        if not 0.0 < local_size <= 1.0:
            raise ValueError(
                f"local_size is a fraction of the input size in (0, 1], got {local_size}"
            )
        base = dict(settings or {})
        self.n_global = n_global
        self.n_local = n_local
        self.local_size = local_size
        self.global_augment = CTAugment({**base, "crop_scale": list(global_crop_scale)}, seed)
        self.local_augment = CTAugment({**base, "crop_scale": list(local_crop_scale)}, seed)
        self.set_random_state(seed)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> MultiCrop:
        """Reseed this transform and both view augmentations it drives."""
        super().set_random_state(seed, state)
        if hasattr(self, "local_augment"):
            self.global_augment.set_random_state(int(self.R.randint(2**31)))
            self.local_augment.set_random_state(int(self.R.randint(2**31)))
        return self

    def local_shape(self, height: int, width: int) -> tuple[int, int]:
        """Height and width of the local crops for an input of ``height x width``."""
        return max(1, round(height * self.local_size)), max(1, round(width * self.local_size))

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        """``n_global`` views at the input's size, then ``n_local`` at :meth:`local_shape`."""
        size = self.local_shape(*image.shape[-2:])
        views = [self.global_augment(image) for _ in range(self.n_global)]
        return views + [self.local_augment(image, size) for _ in range(self.n_local)]


class MultiViewDataset(Dataset):
    """Wraps an image dataset (items are ``(C, H, W)`` tensors) to yield lists of views.

    Labels are never read: items that are ``(image, label)`` tuples are reduced
    to the image, because pre-training must not see labels. A DataLoader with
    automatic batching calls :meth:`__getitems__`, which augments the whole
    batch in one vectorised pass, in the worker processes when there are any.
    """

    def __init__(
        self, images: Dataset | Sequence[torch.Tensor], views: MultiView | MultiCrop
    ) -> None:
        self.images = images
        self.views = views

    def __len__(self) -> int:
        return len(self.images)

    def _image(self, item: int) -> torch.Tensor:
        image = self.images[item]
        if isinstance(image, tuple | list):
            image = image[0]
        return image

    def __getitem__(self, item: int) -> list[torch.Tensor]:
        return self.views(self._image(item))

    def __getitems__(self, items: Sequence[int]) -> list[list[torch.Tensor]]:
        """One list of views per item (what the default collate expects), augmented as a batch."""
        batch = torch.stack([self._image(int(item)) for item in items])
        views = self.views(batch)
        return [list(sample) for sample in zip(*(view.unbind(0) for view in views), strict=True)]

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream from ``seed`` (per epoch and per worker)."""
        self.views.set_random_state(int(seed) % 2**32)


def _channel_std(batch: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel standard deviation (N, C, 1, 1), at least 1e-6.

    From the first two moments: ``Tensor.std`` over the last axis is several
    times slower on CPU for these shapes, and the precision loss is irrelevant
    for scaling augmentation strengths.
    """
    flat = batch.flatten(2)
    mean = flat.mean(dim=2)
    var = (flat * flat).mean(dim=2) - mean * mean
    return var.clamp_min(1e-12).sqrt()[:, :, None, None]


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed this worker's copy of the augmentation.

    Each worker holds a copy of the dataset; without reseeding, every worker would
    replay the same augmentation stream. ``torch.initial_seed()`` inside a
    worker is the loader's base seed (drawn from the loader's generator) plus
    the worker id, so a seeded generator gives reproducible, distinct streams.
    NumPy's and Python's global generators are seeded too.
    """
    worker_init(worker_id)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(torch.initial_seed() % 2**32)
