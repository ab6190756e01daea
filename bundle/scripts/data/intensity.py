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
simulated). Inference uses the peak (scripts.engine.inference_engine.INPUT_NORMALISATION); the shipped weights
were trained with it.

``method="landmarks"`` (training only; needs the image's ``modality``) standardises the histogram toward the training
images of that modality (Nyul & Udupa, MRM 1999, 42:1072-1081; the decile landmarks of Nyul, Udupa & Zhang, IEEE
TMI 2000, 19:143-150): after the percentile scaling, the brain's percentiles ``LANDMARK_PERCENTILES`` are mapped
piecewise linearly onto ``TRAINING_LANDMARKS[modality]``, the mean of the same percentiles over the simulated
training images (``bench/intensity_landmarks.py`` derives the table), extrapolated linearly beyond the end landmarks.
Inference does not use it.
"""

from __future__ import annotations

import numpy as np
import torch

CLIP_MAX = 1.5  # normalised intensities above this are clipped
NORMALISATION = f"divide by the 99th percentile of the brain (non-zero voxels), clip to [0, {CLIP_MAX}]"
METHODS = ("percentile", "wm_peak", "landmarks")
WM_PEAK_LEVEL = 0.8  # where a clean simulated T1w's WM peak sits after percentile scaling would be ~0.98; 0.8 leaves
# headroom below the 1.5 clip for the bright tail of real scans
BACKGROUND_FRACTION = 0.2
NEGATIVE_FRACTION = 0.05
LANDMARK_PERCENTILES = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)
# Mean brain percentiles of the default training images after percentile scaling, per modality:
# ``python ../bench/intensity_landmarks.py data/simulated`` (from bundle/; 20 subjects, seed 0, nine training sites).
TRAINING_LANDMARKS: dict[str, tuple[float, ...]] = {
    "FLAIR": (0.0702, 0.3809, 0.5179, 0.5924, 0.6403, 0.6777, 0.7101, 0.7428, 0.7804, 0.8326, 1.0),
    "PD": (0.1405, 0.6393, 0.6894, 0.7219, 0.7495, 0.7755, 0.8016, 0.83, 0.8641, 0.9111, 1.0),
    "SWI": (0.1287, 0.6022, 0.6673, 0.7057, 0.7366, 0.7649, 0.7931, 0.8234, 0.8584, 0.9049, 1.0),
    "T1CE": (0.0864, 0.4017, 0.5028, 0.5635, 0.6136, 0.6623, 0.7148, 0.7701, 0.825, 0.8864, 1.0),
    "T1w": (0.0859, 0.3911, 0.4927, 0.555, 0.6062, 0.6569, 0.7121, 0.7713, 0.8297, 0.8938, 1.0),
    "T2star": (0.1453, 0.5445, 0.5899, 0.6251, 0.6593, 0.6937, 0.7284, 0.7651, 0.8079, 0.8662, 1.0),
    "T2w": (0.1216, 0.2647, 0.2952, 0.3344, 0.3807, 0.4285, 0.477, 0.5304, 0.5964, 0.7015, 1.0),
}


def brain_mask(volume: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Non-zero voxels: skull-stripped images keep an exact-zero background."""
    return volume != 0


def white_matter_peak(values: np.ndarray, bins: int = 128) -> float:
    """The histogram mode of the brighter half of ``values`` (the white-matter peak of a brain T1w)."""
    bright = values[values >= np.median(values)]
    counts, edges = np.histogram(bright, bins=bins)
    k = int(np.argmax(counts))
    return float(edges[k] + edges[k + 1]) / 2.0


def image_landmarks(values: np.ndarray) -> np.ndarray:
    """The ``LANDMARK_PERCENTILES`` of ``values``."""
    return np.percentile(values, LANDMARK_PERCENTILES)


def map_landmarks(values: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Piecewise-linear map taking landmarks ``source`` to ``target``, continued beyond both ends with the slope of
    the end segment (Nyul & Udupa 1999 map only between the end landmarks; linear continuation keeps the tails
    ordered instead of clipping them)."""
    # Tied landmarks (8-bit or heavily quantised images) would make a vertical segment: nudge them apart.
    source = np.maximum.accumulate(np.asarray(source, np.float64)) + 1e-6 * np.arange(len(source))
    target = np.asarray(target, np.float64)
    out = np.interp(values, source, target)
    low, high = values < source[0], values > source[-1]
    out[low] = target[0] + (values[low] - source[0]) * (target[1] - target[0]) / (source[1] - source[0])
    out[high] = target[-1] + (values[high] - source[-1]) * (target[-1] - target[-2]) / (source[-1] - source[-2])
    return out.astype(np.float32)


def _without_constant_background(array: np.ndarray) -> np.ndarray:
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return array
    lowest = float(finite.min())
    if lowest != 0 and np.count_nonzero(array == lowest) >= BACKGROUND_FRACTION * array.size:
        return array - np.float32(lowest)
    return array


def normalize_intensity(volume: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None,
                        percentile: float = 99.0, clip_max: float = CLIP_MAX,
                        method: str = "percentile", modality: str | None = None) -> np.ndarray | torch.Tensor:
    """``volume`` scaled so the ``percentile`` of the voxels in ``mask`` is 1 (or, with ``method="wm_peak"``, so its
    white-matter peak is ``WM_PEAK_LEVEL``; with ``method="landmarks"``, then mapped so its landmarks are the
    training images' of ``modality``), clipped to ``[0, clip_max]``, float32.

    Clipping at zero removes the small negatives interpolation leaves in real scans; the upper clip keeps a few
    extreme voxels (vessels, fat, noise spikes) from dominating the loss. Returns the type it was given.
    """
    if method not in METHODS:
        raise ValueError(f"intensity normalisation: method {method!r} is unknown; expected one of {list(METHODS)}")
    if method == "landmarks" and modality not in TRAINING_LANDMARKS:
        raise ValueError(f"intensity normalisation: method 'landmarks' needs the image's modality, one of "
                         f"{sorted(TRAINING_LANDMARKS)}; got {modality!r}")
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
    scaled = array / scale
    if method == "landmarks":  # the brain's landmarks decide the map; exact zeros (background) stay zero
        source = image_landmarks(scaled[region])
        scaled = np.where(scaled != 0, map_landmarks(scaled, source, np.asarray(TRAINING_LANDMARKS[modality])), 0)
    out = np.clip(scaled, 0.0, clip_max).astype(np.float32)
    return torch.from_numpy(out).to(volume.device) if as_tensor else out
