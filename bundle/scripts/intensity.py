"""Per-image intensity normalisation shared by training, inference and evaluation.

Scanners store intensities on arbitrary scales (int16 with interpolation negatives, uint8, z-scored floats), so every
image is mapped to a common range before it reaches a network: the brain's 99th percentile goes to 1 and the
background (exact zeros of a skull-stripped image) stays 0.

Two corrections make that robust to scales the shipped weights never saw, and leave images with a zero background
and (almost) no negative brain voxels exactly as before:
- a constant non-zero background (a z-scored or offset whole image: the minimum value filling at least a fifth of
  the volume) is subtracted first, so it becomes the zero background;
- a brain with many negative values (more than 5 %: a z-scored brain) is shifted so its 0.5th percentile is 0.

``method="wm_peak"`` scales by a tissue landmark instead of a percentile: the histogram mode of the brighter half of
the brain (the white-matter peak on T1w) is mapped to ``WM_PEAK_LEVEL``. Real T1w carry a bright tail (vessels, fat,
enhancement) that moves the 99th percentile but not the peak (sim-to-real.md: peak / p99 0.66-0.84 real vs 0.98
simulated). The shipped weights were trained with the percentile, so it stays the default.
"""

from __future__ import annotations

import numpy as np
import torch

NORMALISATION = "divide by the 99th percentile of the brain (non-zero voxels), clip to [0, 1.5]"
METHODS = ("percentile", "wm_peak")
WM_PEAK_LEVEL = 0.8  # where a clean simulated T1w's WM peak sits after percentile scaling would be ~0.98; 0.8 leaves
# headroom below the 1.5 clip for the bright tail of real scans
BACKGROUND_FRACTION = 0.2
NEGATIVE_FRACTION = 0.05


def brain_mask(volume: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Non-zero voxels: skull-stripped images keep an exact-zero background."""
    return volume != 0


def white_matter_peak(values: np.ndarray, bins: int = 128) -> float:
    """The histogram mode of the brighter half of ``values`` (the white-matter peak of a brain T1w)."""
    bright = values[values >= np.median(values)]
    counts, edges = np.histogram(bright, bins=bins)
    k = int(np.argmax(counts))
    return float(edges[k] + edges[k + 1]) / 2.0


def _without_constant_background(array: np.ndarray) -> np.ndarray:
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return array
    lowest = float(finite.min())
    if lowest != 0 and np.count_nonzero(array == lowest) >= BACKGROUND_FRACTION * array.size:
        return array - np.float32(lowest)
    return array


def normalize_intensity(volume: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None,
                        percentile: float = 99.0, clip_max: float = 1.5,
                        method: str = "percentile") -> np.ndarray | torch.Tensor:
    """``volume`` scaled so the ``percentile`` of the voxels in ``mask`` is 1 (or, with ``method="wm_peak"``, so its
    white-matter peak is ``WM_PEAK_LEVEL``), clipped to ``[0, clip_max]``, float32.

    Clipping at zero removes the small negatives interpolation leaves in real scans; the upper clip keeps a few
    extreme voxels (vessels, fat, noise spikes) from dominating the loss. Returns the type it was given.
    """
    if method not in METHODS:
        raise ValueError(f"intensity normalisation: method {method!r} is unknown; expected one of {list(METHODS)}")
    as_tensor = isinstance(volume, torch.Tensor)
    array = volume.detach().cpu().numpy() if as_tensor else np.asarray(volume)
    array = array.astype(np.float32, copy=False)
    if mask is None:
        array = _without_constant_background(array)
    given = mask.cpu() if isinstance(mask, torch.Tensor) else mask
    region = brain_mask(array) if mask is None else np.asarray(given, bool)
    region = region & np.isfinite(array)
    values = array[region]
    if values.size == 0:
        raise ValueError("intensity normalisation: the image has no non-zero (brain) voxels")
    if np.count_nonzero(values < 0) > NEGATIVE_FRACTION * values.size:  # z-scored: move the darkest brain to 0
        offset = np.float32(np.percentile(values, 0.5))
        array = np.where(region, array - offset, 0).astype(np.float32)
        values = array[region]
    if method == "wm_peak":
        scale = white_matter_peak(values[values > 0]) / WM_PEAK_LEVEL if np.any(values > 0) else 0.0
    else:
        scale = float(np.percentile(values, percentile))
    if scale <= 0:
        scale = float(values.max())
    if scale <= 0:
        raise ValueError("intensity normalisation: the image has no positive intensities")
    out = np.clip(array / scale, 0.0, clip_max).astype(np.float32)
    return torch.from_numpy(out).to(volume.device) if as_tensor else out
