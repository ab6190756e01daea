"""Per-image intensity normalisation shared by training, inference and evaluation.

Scanners store intensities on arbitrary scales (int16 with interpolation negatives, uint8, z-scored floats), so every
image is mapped to a common range before it reaches a network: the brain's 99th percentile goes to 1 and the
background (exact zeros of a skull-stripped image) stays 0.
"""

from __future__ import annotations

import numpy as np
import torch

NORMALISATION = "divide by the 99th percentile of the brain (non-zero voxels), clip to [0, 1.5]"


def brain_mask(volume: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Non-zero voxels: skull-stripped images keep an exact-zero background."""
    return volume != 0


def normalize_intensity(volume: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None,
                        percentile: float = 99.0, clip_max: float = 1.5) -> np.ndarray | torch.Tensor:
    """``volume`` scaled so the ``percentile`` of the voxels in ``mask`` is 1, clipped to ``[0, clip_max]``, float32.

    Clipping at zero removes the small negatives interpolation leaves in real scans; the upper clip keeps a few
    extreme voxels (vessels, fat, noise spikes) from dominating the loss. Returns the type it was given.
    """
    as_tensor = isinstance(volume, torch.Tensor)
    array = volume.detach().cpu().numpy() if as_tensor else np.asarray(volume)
    array = array.astype(np.float32, copy=False)
    region = brain_mask(array) if mask is None else np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, bool)
    values = array[region & np.isfinite(array)]
    if values.size == 0:
        raise ValueError("intensity normalisation: the image has no non-zero (brain) voxels")
    scale = float(np.percentile(values, percentile))
    if scale <= 0:
        scale = float(values.max())
    if scale <= 0:
        raise ValueError("intensity normalisation: the image has no positive intensities")
    out = np.clip(array / scale, 0.0, clip_max).astype(np.float32)
    return torch.from_numpy(out).to(volume.device) if as_tensor else out
