"""Synthetic chest/abdomen CT cohort written as real DICOM, with slice labels.

The benchmark needs a dataset that exercises the whole pipeline (DICOM parsing,
geometry, HU handling, patient-level splits) and gives two learnable but not
trivial slice tasks, without shipping patient data:

* ``nodule``: the slice cuts a lung nodule with an in-plane radius of at least
  :data:`NODULE_MIN_RADIUS_MM`. Nodules are small spheres of random size and
  contrast among bright pulmonary-vessel dots, so some positives are subtle.
* ``region``: one of :data:`REGIONS`, from the slice's position between
  per-patient random boundaries, so the anatomy only roughly predicts the label.

Each patient's anatomy, noise and UIDs come from ``(seed, patient index)``, so
the output is byte-identical for a seed and patient ``i`` does not change when
the cohort grows. Files get hash names, are written in shuffled order into
``DIR/<patient>/<study>/`` and so nothing downstream can rely on names or order.

A third task, ``lung`` segmentation, comes as one PNG mask per image of each
patient's first series (``--masks-dir``: ``<dir>/lung/<SOPInstanceUID>.png``), the image-folder
format that :mod:`medssl.datasets.mask_sources` reads.

The command line is ``python -m medssl.synth`` (:mod:`medssl.synth`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from medssl.core.files import write_csv
from medssl.core.registry import look_up

log = logging.getLogger(__name__)

REGIONS = ("upper_thorax", "lower_thorax", "upper_abdomen", "lower_abdomen")
DEFAULTS: dict[str, Any] = {
    "patients": 40,
    "series_per_patient": 2,
    "slices": 24,
    "matrix": 96,
    "scout": True,
    "seed": 0,
}
#: A slice is labelled nodule-positive when its plane cuts a nodule at least this wide.
NODULE_MIN_RADIUS_MM = 1.5
LABEL_COLUMNS = ("patient_id", "study_uid", "series_uid", "sop_uid", "nodule", "region")
MASK_STRUCTURE = "lung"
"""Structure of the synthetic segmentation task: a mask folder ``<masks>/lung/<sop_uid>.png``."""

AIR_HU = -1000.0
HU_INTERCEPT = -1024
STORED_MAX = 4095  # 12 bits stored


@dataclass(frozen=True)
class Reconstruction:
    """One series of a study: the same volume through a different kernel and dose."""

    description: str
    kernel: str
    noise_hu: tuple[float, float]  # range of the per-series Gaussian noise SD
    sharpen: float  # unsharp-mask gain; 0 = soft kernel
    window: tuple[int, int]  # default display window (center, width)


RECONSTRUCTIONS = (
    Reconstruction("ABDOMEN SOFT TISSUE 3.0 B30f", "B30f", (8.0, 15.0), 0.0, (40, 400)),
    Reconstruction("CHEST LUNG 3.0 B70f", "B70f", (25.0, 45.0), 0.8, (-600, 1500)),
)


@dataclass
class Volume:
    """One patient's phantom in HU plus the geometry and labels of its slices."""

    hu: np.ndarray  # (slices, matrix, matrix) float32, row 0 = anterior
    z: np.ndarray  # (slices,) slice positions in mm, top (head) first
    pixel_spacing: float
    slice_spacing: float
    origin_xy: tuple[float, float]
    nodule: np.ndarray  # (slices,) int 0/1
    region: list[str]
    n_nodules: int
    lung: np.ndarray  # (slices, matrix, matrix) bool: aerated lung, the segmentation target


def resolve_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in and values checked, so a typo fails before any file is written."""
    given = dict(settings or {})
    for key in sorted(set(given) - set(DEFAULTS)):
        look_up("synthetic setting", key, DEFAULTS)  # raises, naming the close match
    resolved = {**DEFAULTS, **given}
    for key in ("patients", "series_per_patient", "slices", "matrix"):
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"synthetic setting {key} must be a positive integer, got {value!r}")
    if resolved["slices"] < 4:
        raise ValueError("synthetic setting slices must be at least 4 (one per region)")
    if resolved["matrix"] < 16:
        raise ValueError("synthetic setting matrix must be at least 16 pixels")
    if not isinstance(resolved["seed"], int) or isinstance(resolved["seed"], bool):
        raise ValueError(f"synthetic setting seed must be an integer, got {resolved['seed']!r}")
    resolved["scout"] = bool(resolved["scout"])
    return resolved


# --------------------------------------------------------------------------- phantom


def _ellipse(x: np.ndarray, y: np.ndarray, cx: Any, cy: Any, ax: Any, ay: Any) -> np.ndarray:
    """Normalised squared radius of an ellipse; < 1 inside. Broadcasts over slices."""
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2


def _col(values: np.ndarray | float, n: int) -> np.ndarray:
    """Per-slice values shaped (slices, 1, 1) to broadcast against images."""
    return np.broadcast_to(np.asarray(values, dtype=np.float32), (n,)).reshape(n, 1, 1)


def _bump(t: np.ndarray, start: float, end: float) -> np.ndarray:
    """Smooth 0..1..0 profile on [start, end], 0 outside: organ size along z."""
    u = np.clip((t - start) / max(end - start, 1e-6), 0.0, 1.0)
    return np.where((t >= start) & (t <= end), np.sin(np.pi * u) ** 0.5, 0.0)


@dataclass(frozen=True)
class _Frame:
    """A patient's scan geometry: slice positions, pixel grid and region boundaries.

    ``t`` runs from 0 at the top slice to 1 at the bottom one; ``bounds`` are
    the region boundaries in ``t`` (the second is the diaphragm).
    """

    x: np.ndarray  # (1, 1, matrix) mm; patient left is +x (LPS), image right
    y: np.ndarray  # (1, matrix, 1) mm; posterior is +y, image bottom
    z: np.ndarray
    t: np.ndarray
    pixel_spacing: float
    slice_spacing: float
    origin_xy: tuple[float, float]
    bounds: tuple[float, float, float]
    region: list[str]

    def along_z(self, values: np.ndarray | float) -> np.ndarray:
        """Per-slice values shaped to broadcast against the images."""
        return _col(values, len(self.z))

    def where_z(self, condition: np.ndarray) -> np.ndarray:
        """A per-slice condition as a mask that broadcasts against the images."""
        return _col(condition, len(self.z)) > 0


@dataclass(frozen=True)
class _Body:
    """The body outline: centre, outer semi-axes at the top, fat rim, inner semi-axes."""

    cx: float
    cy: float
    a0: float
    b0: float
    fat: float
    ai: np.ndarray  # (slices, 1, 1) semi-axes inside the fat rim
    bi: np.ndarray
    inner: np.ndarray  # (slices, matrix, matrix) bool: soft tissue, where organs go


@dataclass
class _Canvas:
    """The HU volume being painted, in its patient's frame and body."""

    hu: np.ndarray
    frame: _Frame
    body: _Body

    def paint(self, mask: np.ndarray, value: float | np.ndarray) -> None:
        """Overwrite tissue inside the body (organs never leave the body outline)."""
        m = mask & self.body.inner
        hu = self.hu
        hu[m] = value if np.isscalar(value) else np.broadcast_to(value, hu.shape)[m]

    def ellipse(self, cx: Any, cy: Any, ax: Any, ay: Any) -> np.ndarray:
        """:func:`_ellipse` on this volume's pixel grid."""
        return _ellipse(self.frame.x, self.frame.y, cx, cy, ax, ay)


def make_volume(rng: np.random.Generator, slices: int, matrix: int) -> Volume:
    """Draw one patient's anatomy and render it slice by slice (vectorised over z).

    The organs are painted in a fixed order, each over the ones before, and
    every random draw happens in that order: the same generator state gives
    the same patient.
    """
    frame = _draw_frame(rng, slices, matrix)
    hu = np.full((slices, matrix, matrix), AIR_HU, dtype=np.float32)
    canvas = _Canvas(hu, frame, _paint_body(rng, hu, frame))
    lungs, lung_size = _paint_lungs(rng, canvas)
    _paint_mediastinum_and_heart(rng, canvas, lung_size)
    _paint_vessels(rng, canvas)
    cortical, cancellous = _paint_spine(rng, canvas)
    _paint_ribs(rng, canvas)
    _paint_upper_abdomen(rng, canvas)
    _paint_kidneys_and_psoas(rng, canvas)
    _paint_lower_abdomen(rng, canvas, cortical, cancellous)
    lung_now = _add_pulmonary_vessels(rng, hu, lungs)
    nodule, n_nodules = _add_nodules(
        rng,
        hu,
        lung_now,
        frame.x,
        frame.y,
        frame.z,
        frame.pixel_spacing,
        frame.slice_spacing,
        frame.t,
        frame.bounds[1],
    )
    return Volume(
        hu=hu,
        z=frame.z,
        pixel_spacing=frame.pixel_spacing,
        slice_spacing=frame.slice_spacing,
        origin_xy=frame.origin_xy,
        nodule=nodule,
        region=frame.region,
        n_nodules=n_nodules,
        lung=lung_now & canvas.body.inner,
    )


def _draw_frame(rng: np.random.Generator, slices: int, matrix: int) -> _Frame:
    """Field of view, scan length and position, and the region boundaries."""
    fov = rng.uniform(360.0, 420.0)
    ps = round(fov / matrix, 4)
    length = rng.uniform(480.0, 560.0)  # upper thorax to pelvis
    spacing = round(length / (slices - 1), 2)
    z_top = round(rng.uniform(-80.0, 80.0), 2)
    z = np.round(z_top - spacing * np.arange(slices), 3)
    t = (z_top - z) / (spacing * (slices - 1))  # 0 at the top slice, 1 at the bottom

    # Region boundaries in t: jittered per patient so position alone is not the label.
    b1 = 0.25 + rng.uniform(-0.06, 0.06)
    b2 = 0.50 + rng.uniform(-0.06, 0.06)  # diaphragm: thorax above, abdomen below
    b3 = 0.75 + rng.uniform(-0.06, 0.06)
    region_idx = np.searchsorted(np.array([b1, b2, b3]), t, side="right")

    coords = (np.arange(matrix, dtype=np.float32) - (matrix - 1) / 2) * ps
    return _Frame(
        x=coords.reshape(1, 1, matrix),
        y=coords.reshape(1, matrix, 1),
        z=z,
        t=t,
        pixel_spacing=ps,
        slice_spacing=spacing,
        origin_xy=(float(-(matrix - 1) / 2 * ps), float(-(matrix - 1) / 2 * ps)),
        bounds=(b1, b2, b3),
        region=[REGIONS[i] for i in region_idx],
    )


def _paint_body(rng: np.random.Generator, hu: np.ndarray, frame: _Frame) -> _Body:
    """Body: fat rim around soft tissue; a little wider in the chest and pelvis."""
    t = frame.t
    a0, b0 = rng.uniform(135.0, 170.0), rng.uniform(95.0, 125.0)
    a = frame.along_z(a0 * (0.95 + 0.08 * np.cos(2 * np.pi * t)))
    b = frame.along_z(b0 * (0.92 + 0.1 * np.sin(np.pi * t)))
    cx, cy = rng.uniform(-8, 8), rng.uniform(-8, 8)
    fat = rng.uniform(8.0, 25.0)
    body = _ellipse(frame.x, frame.y, cx, cy, a, b) < 1
    hu[body] = rng.uniform(-115, -85)
    ai, bi = a - fat, b - fat
    inner = _ellipse(frame.x, frame.y, cx, cy, ai, bi) < 1
    hu[inner] = rng.uniform(35, 50)
    return _Body(cx, cy, a0, b0, fat, ai, bi, inner)


def _paint_lungs(rng: np.random.Generator, c: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    """Lungs: apex to diaphragm, largest in the mid thorax; textured parenchyma.

    Returns the lung mask and the per-slice lung size (the mediastinum follows it).
    """
    f, body = c.frame, c.body
    n, matrix = c.hu.shape[0], c.hu.shape[1]
    lung_size = f.along_z(_bump(f.t, -0.12, f.bounds[1] + 0.03))
    lung_present = lung_size > 0.05
    lung_hu = rng.uniform(-880, -820)
    texture = ndimage.gaussian_filter(
        rng.standard_normal((n, matrix, matrix)).astype(np.float32), sigma=(0, 1.2, 1.2)
    )
    lungs = np.zeros(c.hu.shape, dtype=bool)
    for side in (-1, 1):
        lungs |= lung_present & (
            c.ellipse(
                body.cx + side * 0.47 * body.ai,
                body.cy - 0.05 * body.bi,
                np.maximum(0.34 * body.ai * lung_size, 1e-3),
                np.maximum(0.66 * body.bi * lung_size, 1e-3),
            )
            < 1
        )
    c.paint(lungs, lung_hu + 100.0 * texture)
    return lungs, lung_size


def _paint_mediastinum_and_heart(
    rng: np.random.Generator, c: _Canvas, lung_size: np.ndarray
) -> None:
    """Mediastinal fat between the lungs, so the heart and vessels stand out in it;
    the heart in the lower thorax, pushing the left lung aside."""
    f, body = c.frame, c.body
    cx, cy, ai, bi = body.cx, body.cy, body.ai, body.bi
    mediastinum = (lung_size > 0.05) & (
        c.ellipse(cx + 0.03 * ai, cy - 0.1 * bi, 0.22 * ai, np.maximum(0.55 * bi * lung_size, 1e-3))
        < 1
    )
    c.paint(mediastinum, rng.uniform(-110, -80))

    b1, b2, _ = f.bounds
    heart_size = f.along_z(_bump(f.t, b1 - 0.08, b2 + 0.02))
    heart = (heart_size > 0.05) & (
        c.ellipse(
            cx + 0.12 * ai,
            cy - 0.18 * bi,
            np.maximum(0.3 * ai * heart_size, 1e-3),
            np.maximum(0.32 * bi * heart_size, 1e-3),
        )
        < 1
    )
    c.paint(heart, rng.uniform(35, 50))


def _paint_vessels(rng: np.random.Generator, c: _Canvas) -> None:
    """Contrast-enhanced vessels: descending aorta down to the bifurcation, then
    iliac arteries; ascending aorta in the chest; the less enhanced IVC."""
    f, body = c.frame, c.body
    cx, cy, ai, bi = body.cx, body.cy, body.ai, body.bi
    b1, b2, b3 = f.bounds
    t = f.t
    contrast = rng.uniform(150, 300)
    r_ao = rng.uniform(10, 14)
    bif = b3 + rng.uniform(0.02, 0.1)
    above_bif = f.where_z(t < bif)
    c.paint(above_bif & (c.ellipse(cx + 0.1 * ai, cy + 0.3 * bi, r_ao, r_ao) < 1), contrast)
    spread = f.along_z(np.clip((t - bif) * 1.2, 0, None)) * ai
    for side in (-1, 1):
        iliac = c.ellipse(cx + side * (0.08 * ai + spread), cy + 0.3 * bi, 7.0, 7.0) < 1
        c.paint(~above_bif & iliac, contrast)
    ascending = f.where_z((t > b1 - 0.12) & (t < b2 - 0.05))
    c.paint(ascending & (c.ellipse(cx - 0.02 * ai, cy - 0.1 * bi, 14, 14) < 1), contrast)
    abdomen = f.where_z(t > b2 - 0.02)
    c.paint(abdomen & (c.ellipse(cx - 0.12 * ai, cy + 0.25 * bi, 10, 9) < 1), contrast * 0.5)


def _paint_spine(rng: np.random.Generator, c: _Canvas) -> tuple[float, float]:
    """Spine: cortical shell, cancellous core, discs between vertebrae, canal.

    Returns the cortical and cancellous bone HU (the pelvis is the same bone).
    """
    f, body = c.frame, c.body
    cx = body.cx
    r_vb = rng.uniform(15, 20)
    vy = body.cy + 0.6 * body.bi
    cortical, cancellous = rng.uniform(800, 1200), rng.uniform(250, 380)
    disc = f.where_z(((f.z + rng.uniform(0, 30)) % 30.0) < 7.0)
    vertebra = c.ellipse(cx, vy, r_vb, r_vb * 0.85) < 1
    c.paint(vertebra, cortical)
    core = c.ellipse(cx, vy, r_vb - 3, r_vb * 0.85 - 3) < 1
    c.paint(core & ~disc, cancellous)
    c.paint(vertebra & disc, 80.0)
    c.paint(c.ellipse(cx, vy + r_vb + 6, 6, 6) < 1, 15.0)
    c.paint(c.ellipse(cx, vy + r_vb + 18, 4, 8) < 1, cortical * 0.7)
    return cortical, cancellous


def _paint_ribs(rng: np.random.Generator, c: _Canvas) -> None:
    """Ribs: small bone sections just inside the fat, in the thorax only."""
    f, body = c.frame, c.body
    thorax = f.where_z(f.t < f.bounds[1] + 0.05)
    for angle in np.linspace(0.15 * np.pi, 0.85 * np.pi, 7):
        for side in (-1, 1):
            rx = body.cx + side * 0.9 * body.ai * np.cos(angle)
            ry = body.cy + 0.9 * body.bi * np.sin(angle - np.pi / 2) * 0.95
            c.paint(thorax & (c.ellipse(rx, ry, 5.0, 4.0) < 1), rng.uniform(500, 900))


def _paint_upper_abdomen(rng: np.random.Generator, c: _Canvas) -> None:
    """Upper abdomen: liver dome rising into the lowest lung slices, spleen, stomach."""
    f, body = c.frame, c.body
    cx, cy, ai, bi = body.cx, body.cy, body.ai, body.bi
    _, b2, b3 = f.bounds
    liver_size = f.along_z(_bump(f.t, b2 - 0.08, b2 + 0.75 * (b3 - b2) + 0.1))
    liver = (liver_size > 0.05) & (
        c.ellipse(
            cx - 0.38 * ai,
            cy - 0.02 * bi,
            np.maximum(0.5 * ai * liver_size, 1e-3),
            np.maximum(0.65 * bi * liver_size, 1e-3),
        )
        < 1
    )
    c.paint(liver, rng.uniform(55, 70))
    upper_abd = f.where_z((f.t > b2 - 0.02) & (f.t < b3))
    c.paint(upper_abd & (c.ellipse(cx + 0.55 * ai, cy + 0.3 * bi, 0.15 * ai, 0.25 * bi) < 1), 50)
    stomach = upper_abd & (c.ellipse(cx + 0.35 * ai, cy - 0.35 * bi, 0.25 * ai, 0.2 * bi) < 1)
    c.paint(stomach, 20.0)
    if rng.random() < 0.7:
        c.paint(stomach & (f.y < cy - 0.45 * bi), AIR_HU)


def _paint_kidneys_and_psoas(rng: np.random.Generator, c: _Canvas) -> None:
    """Kidneys straddle the upper/lower abdomen boundary; psoas muscles below."""
    f, body = c.frame, c.body
    cx, cy, ai, bi = body.cx, body.cy, body.ai, body.bi
    _, b2, b3 = f.bounds
    abdomen = f.where_z(f.t > b2 - 0.02)
    kidney_size = f.along_z(_bump(f.t, b3 - 0.14, b3 + 0.1))
    for side in (-1, 1):
        kidney = (kidney_size > 0.05) & (
            c.ellipse(
                cx + side * 0.4 * ai,
                cy + 0.42 * bi,
                np.maximum(0.12 * ai * kidney_size, 1e-3),
                np.maximum(0.18 * bi * kidney_size, 1e-3),
            )
            < 1
        )
        c.paint(kidney, rng.uniform(150, 200))
        psoas = abdomen & (c.ellipse(cx + side * 0.2 * ai, cy + 0.55 * bi, 12, 14) < 1)
        c.paint(psoas, 50.0)


def _paint_lower_abdomen(
    rng: np.random.Generator, c: _Canvas, cortical: float, cancellous: float
) -> None:
    """Lower abdomen: bowel loops with gas, iliac wings, bladder at the bottom."""
    f, body = c.frame, c.body
    cx, cy, ai, bi = body.cx, body.cy, body.ai, body.bi
    b3 = f.bounds[2]
    lower = f.where_z(f.t > b3)
    for _ in range(6):
        bx = rng.uniform(-0.45, 0.45) * (body.a0 - body.fat)
        by = rng.uniform(-0.5, 0.1) * (body.b0 - body.fat)
        loop = lower & (c.ellipse(cx + bx, cy + by, rng.uniform(12, 25), rng.uniform(10, 20)) < 1)
        c.paint(loop, rng.uniform(20, 40))
        c.paint(loop & (c.ellipse(cx + bx, cy + by, 5, 4) < 1), AIR_HU)
    pelvis_start = b3 + rng.uniform(0.25, 0.45) * (1 - b3)
    pelvis = f.where_z(f.t > pelvis_start)
    for side in (-1, 1):
        wing = c.ellipse(cx + side * 0.62 * ai, cy + 0.25 * bi, 0.1 * ai, 0.3 * bi)
        c.paint(pelvis & (wing < 1), cortical * 0.8)
        c.paint(pelvis & (wing < 0.5), cancellous)
    bladder_start = 1 - rng.uniform(0.08, 0.16)
    bladder = f.where_z(f.t > bladder_start)
    c.paint(bladder & (c.ellipse(cx, cy - 0.3 * bi, 0.22 * ai, 0.25 * bi) < 1), 10.0)


def _add_pulmonary_vessels(
    rng: np.random.Generator, hu: np.ndarray, lungs: np.ndarray
) -> np.ndarray:
    """Pulmonary vessels: bright blurred dots inside the lungs (nodule distractors).

    Returns the aerated lung (the lung mask where the other organs left air),
    which is where nodules go and what the segmentation task segments.
    """
    lung_now = lungs & (hu < -500)
    impulses = np.zeros_like(hu)
    sigma = 0.7
    for s in np.flatnonzero(lung_now.any(axis=(1, 2))):
        rows, cols = np.nonzero(lung_now[s])
        count = min(len(rows), int(rng.poisson(0.02 * len(rows) + 4)))
        pick = rng.choice(len(rows), size=count, replace=False)
        amp = rng.uniform(250, 750, size=count) * 2 * np.pi * sigma**2
        np.add.at(impulses[s], (rows[pick], cols[pick]), amp)
    hu += ndimage.gaussian_filter(impulses, sigma=(0, sigma, sigma)) * lung_now
    return lung_now


def _add_nodules(
    rng: np.random.Generator,
    hu: np.ndarray,
    lung: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    ps: float,
    spacing: float,
    t: np.ndarray,
    diaphragm: float,
) -> tuple[np.ndarray, int]:
    """Paint 0-6 spherical nodules into the lungs; return per-slice labels and the count.

    A nodule is centred near a slice plane (so most nodules are seen at all), of
    random radius and contrast; the in-plane disc is partial-volume blended so
    a 2 mm nodule in 4 mm pixels is a faint dot rather than a full bright pixel.
    """
    labels = np.zeros(len(z), dtype=np.int64)
    # About one slice in ten is positive: rare enough to be realistic, frequent
    # enough that small training fractions still contain positives.
    count = int(rng.choice(7, p=[0.15, 0.15, 0.2, 0.2, 0.15, 0.1, 0.05]))
    candidates = np.flatnonzero((t > 0.08) & (t < diaphragm - 0.04) & lung.any(axis=(1, 2)))
    if len(candidates) == 0:
        return labels, 0
    placed = 0
    for _ in range(count):
        s = int(rng.choice(candidates))
        rows, cols = np.nonzero(lung[s])
        k = int(rng.integers(len(rows)))
        cx, cy = float(x[0, 0, cols[k]]), float(y[0, rows[k], 0])
        radius = float(np.exp(rng.uniform(np.log(2.0), np.log(10.0))))
        cz = z[s] + rng.uniform(-0.6, 0.6) * min(radius, spacing / 2)
        value = rng.uniform(-550, 60)
        placed += 1
        for j in range(len(z)):
            dz = z[j] - cz
            if abs(dz) >= radius:
                continue
            r_in = math.sqrt(radius**2 - dz**2)
            dist = np.sqrt((x[0] - cx) ** 2 + (y[0] - cy) ** 2)
            cover = np.clip((r_in - dist) / ps + 0.5, 0.0, 1.0)
            total = float(cover.sum())
            if total <= 0:
                continue
            cover *= min(1.0, math.pi * r_in**2 / ps**2 / total)
            hu[j] = hu[j] * (1 - cover) + value * cover
            if r_in >= NODULE_MIN_RADIUS_MM:
                labels[j] = 1
    return labels, placed


def reconstruct(rng: np.random.Generator, hu: np.ndarray, recon: Reconstruction) -> np.ndarray:
    """Kernel blur or sharpening plus Gaussian noise, rounded to 12-bit stored values."""
    soft = ndimage.gaussian_filter(hu, sigma=(0, 0.6, 0.6))
    if recon.sharpen:
        soft = soft + recon.sharpen * (soft - ndimage.gaussian_filter(soft, sigma=(0, 1.0, 1.0)))
    noise_sd = rng.uniform(*recon.noise_hu)
    image = soft + rng.normal(0.0, noise_sd, size=hu.shape).astype(np.float32)
    stored = np.clip(np.rint(image) - HU_INTERCEPT, 0, STORED_MAX)
    return stored.astype(np.uint16)


def scout_image(hu: np.ndarray) -> np.ndarray:
    """A coronal projection (slices x matrix) as stored values: the localizer."""
    attenuation = np.clip(hu - AIR_HU, 0, None).mean(axis=1)
    scaled = attenuation / max(float(attenuation.max()), 1.0) * 2000.0
    return np.clip(np.rint(scaled), 0, STORED_MAX).astype(np.uint16)


# --------------------------------------------------------------------------- DICOM


#: The first entropy source of every UID. It is part of the cohort's identity, not
#: a module name: another value would give every synthetic file new UIDs, names and bytes.
UID_SALT = "medssl.synth"


def _uid(seed: int, *parts: object) -> str:
    """Valid, deterministic UID: pydicom's root plus a hash of the seed and parts."""
    return generate_uid(entropy_srcs=[UID_SALT, str(seed), *map(str, parts)])


def _file_name(sop_uid: str) -> str:
    """A name that looks random but is fixed by the UID (no order, no meaning)."""
    return hashlib.sha1(sop_uid.encode()).hexdigest()[:24] + ".dcm"


def _ds(value: float) -> str:
    """Decimal string within DICOM's 16-character DS limit."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.4e}"


def _template(tags: dict[str, Any], shape: tuple[int, int]) -> FileDataset:
    """A series' explicit-VR little-endian dataset with 12-bit unsigned pixels.

    Built once per series and then only the per-image tags change, because
    creating ~40 validated elements per file would dominate the run time.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = tags["SOPClassUID"]
    meta.MediaStorageSOPInstanceUID = tags["SOPInstanceUID"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = str(HU_INTERCEPT)
    ds.RescaleType = "HU"
    return ds


def _write_image(ds: FileDataset, path: Path, varying: dict[str, Any], pixels: np.ndarray) -> None:
    """Set one image's own tags and pixels on its series template and write the file."""
    for keyword, value in varying.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _patient_tags(seed: int, index: int, rng: np.random.Generator) -> dict[str, Any]:
    """Patient/study-level tags shared by every file of the patient."""
    patient_id = f"SYN{seed}-{index:04d}"
    return {
        "PatientID": patient_id,
        "PatientName": f"Synthetic^{index:04d}",
        "PatientSex": str(rng.choice(["F", "M"])),
        "PatientAge": f"{int(rng.integers(25, 85)):03d}Y",
        "PatientBirthDate": "",
        "StudyInstanceUID": _uid(seed, patient_id, "study"),
        "StudyID": "1",
        "StudyDate": "20240101",
        "StudyTime": "120000",
        "AccessionNumber": f"A{seed}{index:05d}",
        "ReferringPhysicianName": "",
        "StudyDescription": "CT CHEST ABDOMEN PELVIS WITH CONTRAST",
        "FrameOfReferenceUID": _uid(seed, patient_id, "frame"),
        "PositionReferenceIndicator": "",
        "Manufacturer": "medssl synthetic",
        "ManufacturerModelName": "phantom",
        "BodyPartExamined": "CHESTABDOMEN",
        "PatientPosition": "HFS",
        "KVP": "120",
        "Modality": "CT",
        "SOPClassUID": CTImageStorage,
        "AcquisitionNumber": 1,
    }


def _study_folder(study_uid: str) -> str:
    return "ST" + hashlib.sha1(study_uid.encode()).hexdigest()[:10]


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """A binary mask as an 8-bit PNG (0 background, 255 foreground), viewable in any viewer."""
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path, optimize=False)


#: One file to write: its series template, path, per-image tags and stored pixels.
_Job = tuple[FileDataset, Path, dict[str, Any], np.ndarray]


def write_patient(
    root: Path,
    seed: int,
    index: int,
    settings: dict[str, Any],
    masks_root: Path | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Render and write one patient; return its label rows and counts.

    With ``masks_root``, the lung mask of every image of the first series is
    written as ``masks_root/lung/<SOPInstanceUID>.png`` (the image-folder mask
    format). One annotated reconstruction per patient is what annotators
    usually deliver, and it keeps the segmentation task's cost near that of a
    classification task.
    """
    rng = np.random.default_rng([seed, index])
    base = _patient_tags(seed, index, rng)
    vol = make_volume(rng, settings["slices"], settings["matrix"])
    folder = root / base["PatientID"] / _study_folder(base["StudyInstanceUID"])
    folder.mkdir(parents=True, exist_ok=True)

    jobs: list[_Job] = []
    rows: list[dict[str, Any]] = []
    for k in range(settings["series_per_patient"]):
        series_masks = masks_root if k == 0 else None
        series_jobs, series_rows = _series_jobs(rng, seed, base, vol, k, folder, series_masks)
        jobs.extend(series_jobs)
        rows.extend(series_rows)
    if settings["scout"]:
        jobs.append(_scout_job(seed, base, vol, folder))

    for j in rng.permutation(len(jobs)):
        _write_image(*jobs[j])
    counts = {
        "images": len(vol.z) * settings["series_per_patient"],
        "nodules": vol.n_nodules,
        "scouts": int(settings["scout"]),
    }
    return rows, counts


def _series_jobs(
    rng: np.random.Generator,
    seed: int,
    base: dict[str, Any],
    vol: Volume,
    k: int,
    folder: Path,
    masks_root: Path | None,
) -> tuple[list[_Job], list[dict[str, Any]]]:
    """Reconstruction ``k`` of the volume: its files to write and its label rows.

    The lung masks of its images are written to ``masks_root`` when given.
    """
    recon = RECONSTRUCTIONS[k % len(RECONSTRUCTIONS)]
    series_uid = _uid(seed, base["PatientID"], "series", k)
    stored = reconstruct(rng, vol.hu, recon)
    matrix = stored.shape[1]
    template = _template(
        {
            **base,
            "SeriesInstanceUID": series_uid,
            "SOPInstanceUID": series_uid,  # replaced per image
            "SeriesNumber": k + 2,
            "SeriesDescription": recon.description,
            "ConvolutionKernel": recon.kernel,
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "PixelSpacing": [_ds(vol.pixel_spacing), _ds(vol.pixel_spacing)],
            "SliceThickness": _ds(vol.slice_spacing),
            "SpacingBetweenSlices": _ds(vol.slice_spacing),
            "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
            "WindowCenter": str(recon.window[0]),
            "WindowWidth": str(recon.window[1]),
        },
        (matrix, matrix),
    )
    jobs: list[_Job] = []
    rows: list[dict[str, Any]] = []
    for s in range(len(vol.z)):
        sop_uid = _uid(seed, base["PatientID"], "image", k, s)
        varying = {
            "SOPInstanceUID": sop_uid,
            "InstanceNumber": s + 1,
            "ImagePositionPatient": [
                _ds(vol.origin_xy[0]),
                _ds(vol.origin_xy[1]),
                _ds(float(vol.z[s])),
            ],
            "SliceLocation": _ds(float(vol.z[s])),
        }
        jobs.append((template, folder / _file_name(sop_uid), varying, stored[s]))
        if masks_root is not None:
            write_mask_png(masks_root / MASK_STRUCTURE / f"{sop_uid}.png", vol.lung[s])
        rows.append(
            {
                "patient_id": base["PatientID"],
                "study_uid": base["StudyInstanceUID"],
                "series_uid": series_uid,
                "sop_uid": sop_uid,
                "nodule": int(vol.nodule[s]),
                "region": vol.region[s],
            }
        )
    return jobs, rows


def _scout_job(seed: int, base: dict[str, Any], vol: Volume, folder: Path) -> _Job:
    """The localizer: a coronal projection in its own series (which convert rejects)."""
    sop_uid = _uid(seed, base["PatientID"], "scout")
    scout = scout_image(vol.hu)
    template = _template(
        {
            **base,
            "SeriesInstanceUID": _uid(seed, base["PatientID"], "series", "scout"),
            "SOPInstanceUID": sop_uid,
            "SeriesNumber": 1,
            "SeriesDescription": "TOPOGRAM",
            "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
            "PixelSpacing": [_ds(vol.slice_spacing), _ds(vol.pixel_spacing)],
            "SliceThickness": "1",
            "ImageOrientationPatient": ["1", "0", "0", "0", "0", "-1"],
        },
        scout.shape,
    )
    varying = {
        "SOPInstanceUID": sop_uid,
        "InstanceNumber": 1,
        "ImagePositionPatient": [_ds(vol.origin_xy[0]), "0", _ds(float(vol.z[0]))],
    }
    return template, folder / _file_name(sop_uid), varying, scout


def _make_temp_dir(target: Path) -> Path:
    """A fresh hidden sibling of ``target`` with umask permissions.

    ``tempfile.mkdtemp`` would create it 0700, and the renamed cohort folder
    would then be unreadable to the rest of a group sharing the results.
    """
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.part"
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        return tmp


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished folder onto ``target``, removing an older one first.

    ``os.replace`` cannot overwrite a non-empty directory, so an existing one is
    first renamed aside; a reader never sees a half-written ``target``.
    """
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)


def synthesize(
    out_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    settings: dict[str, Any] | None = None,
    masks_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write the cohort to ``out_dir`` and its label table to ``labels_csv``; return a summary.

    With ``masks_dir``, a lung mask per image goes to ``masks_dir/lung/<sop_uid>.png``.
    """
    cfg = resolve_settings(settings)
    started = time.perf_counter()
    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(target)
    mask_target = None if masks_dir is None else Path(masks_dir)
    mask_tmp = None if mask_target is None else _make_temp_dir(mask_target)
    if mask_tmp is not None:
        (mask_tmp / MASK_STRUCTURE).mkdir()
    rows: list[dict[str, Any]] = []
    n_nodules = n_scouts = 0
    try:
        for index in range(cfg["patients"]):
            patient_rows, counts = write_patient(tmp, cfg["seed"], index, cfg, mask_tmp)
            rows.extend(patient_rows)
            n_nodules += counts["nodules"]
            n_scouts += counts["scouts"]
        labels = pd.DataFrame(rows, columns=list(LABEL_COLUMNS))
        _replace_dir(tmp, target)
        if mask_tmp is not None:
            _replace_dir(mask_tmp, mask_target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if mask_tmp is not None:
            shutil.rmtree(mask_tmp, ignore_errors=True)
        raise
    write_csv(labels_csv, labels)

    summary = {
        "patients": cfg["patients"],
        "series": cfg["patients"] * cfg["series_per_patient"],
        "images": len(labels),
        "scouts": n_scouts,
        "files": len(labels) + n_scouts,
        "nodules": n_nodules,
        "nodule_positive_images": int(labels["nodule"].sum()),
        "regions": {r: int((labels["region"] == r).sum()) for r in REGIONS},
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info(
        "synthesised %d patients, %d series, %d images (+%d scouts) in %.1f s into %s; "
        "%d nodules, %d nodule-positive images; regions %s",
        summary["patients"],
        summary["series"],
        summary["images"],
        summary["scouts"],
        summary["seconds"],
        target,
        summary["nodules"],
        summary["nodule_positive_images"],
        summary["regions"],
    )
    return summary
