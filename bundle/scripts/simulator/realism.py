"""Real-scan artefacts the clean simulation lacks, measured on a real case (docs/sim_vs_real.md), as opt-in steps.

The default simulation does not call these, so the held-out evaluation subjects (seed 1000) and the thresholds
measured on them stay as they are; ``calibrate`` applies them to a finished image (training-time augmentation, or
``scripts.sim_vs_real --calibrate`` to show the calibrated images cover the real statistics).

- ``bright_tail``: vessel- and fat-like bright blobs (sparse maxima of a short-correlation random field), which
  lower the white-matter peak relative to the 99th percentile (real T1w 0.51-0.84, clean simulation up to 0.92;
  sim-to-real.md);
- ``thick_slice_resampling``: clinical 2D slices (3-6 mm) averaged and linearly resampled back to the fine grid,
  the through-plane blur of clinical scans co-registered to 1 mm (real z/xy gradient ratio 0.56-0.76 vs ~1.0);
- ``quantise``: 8-bit storage;
- an arbitrary intensity scale and offset (normalisation must undo it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .interpolation import resample_separable
from .random_fields import smooth_random_field


@dataclass(frozen=True)
class RealismRanges:
    """Uniform ranges of each artefact's strength; the probability that each step is applied at all."""

    tail_fraction: tuple[float, float] = (0.005, 0.04)  # of brain voxels; above 1 % it reaches the 99th percentile
    tail_level: tuple[float, float] = (1.5, 3.5)  # x the bright-half median (real T1w tail: ~2x the WM peak)
    slice_thickness_vox: tuple[int, int] = (3, 8)  # clinical 2D: 3-6 mm slices plus gaps
    thick_slice_probability: float = 0.5
    quantise_probability: float = 0.2
    scale: tuple[float, float] = (0.01, 5000.0)  # log-uniform


def bright_tail(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, fraction: float,
                level: float) -> np.ndarray:
    """``image`` with about ``fraction`` of the brain voxels raised towards ``level`` x the median of the brain's
    bright half, in blobs 1-2 voxels wide (vessels, fat, enhancing tissue); each blob's centre is brightest, and the
    heights spread evenly from 1 to ``level`` x (a tail of values, not one spike)."""
    field = smooth_random_field(image.shape, rng, 2.0)
    threshold = np.quantile(field[mask], 1.0 - fraction)
    blobs = mask & (field > threshold)
    values = image[mask]
    reference = float(np.median(values[values >= np.median(values)]))
    rank = np.argsort(np.argsort(field[blobs]))  # uniform spread of heights from 1 to ``level`` x the reference
    height = 1.0 + (level - 1.0) * rank / max(rank.size - 1, 1)
    out = image.copy()
    out[blobs] = np.maximum(out[blobs], height * reference)
    return out


def thick_slice_resampling(image: np.ndarray, axis: int, thickness_vox: int) -> np.ndarray:
    """Average ``thickness_vox`` neighbouring slices along ``axis`` into one and interpolate linearly back."""
    n = image.shape[axis]
    count = max(1, n // thickness_vox)
    trimmed = np.take(image, np.arange(count * thickness_vox), axis=axis)
    shape = list(image.shape)
    shape[axis:axis + 1] = [count, thickness_vox]
    slabs = trimmed.reshape(shape).mean(axis=axis + 1)
    centres = (np.arange(n) - (thickness_vox - 1) / 2.0) / thickness_vox  # fine voxel -> slab index
    positions = [np.arange(size, dtype=np.float64) for size in slabs.shape]
    positions[axis] = np.clip(centres, 0, count - 1)
    return resample_separable(slabs, positions).astype(np.float32)


def quantise(image: np.ndarray, levels: int = 256) -> np.ndarray:
    """``image`` stored in ``levels`` grey levels (8 bit), on its own maximum."""
    top = float(image.max())
    return image if top <= 0 else (np.round(image / top * (levels - 1)) * (top / (levels - 1))).astype(np.float32)


def calibrate(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, slice_axis: int = 2,
              ranges: RealismRanges = RealismRanges()) -> np.ndarray:
    """One random draw of every real-scan artefact above, applied to a simulated image (background stays 0)."""
    out = bright_tail(image, mask, rng, rng.uniform(*ranges.tail_fraction), rng.uniform(*ranges.tail_level))
    if rng.random() < ranges.thick_slice_probability:
        out = thick_slice_resampling(out, slice_axis, int(rng.integers(ranges.slice_thickness_vox[0],
                                                                       ranges.slice_thickness_vox[1] + 1))) * mask
    if rng.random() < ranges.quantise_probability:
        out = quantise(out)
    return (out * np.exp(rng.uniform(*np.log(ranges.scale)))).astype(np.float32)
