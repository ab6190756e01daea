"""Smooth random fields: the source of spatial randomness (deformations, bias, skull-strip depth, vessels)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .interpolation import resample_separable


def smooth_random_field(shape: tuple[int, ...], rng: np.random.Generator, correlation_vox: float) -> np.ndarray:
    """Zero-mean, unit-s.d. Gaussian random field of ``shape`` whose features are about ``correlation_vox`` wide.

    Long correlations are drawn on a coarse lattice and upsampled (cheap); short ones are white noise smoothed at
    full resolution.
    """
    shape = tuple(int(s) for s in shape)
    if correlation_vox >= 8:
        step = correlation_vox / 2.0
        coarse_shape = tuple(int(np.ceil(s / step)) + 2 for s in shape)
        coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), 1.0, mode="wrap")
        # Sample the coarse lattice (spacing ``step`` fine voxels) at every fine voxel, separably.
        field = resample_separable(coarse, [np.arange(n) / step + 0.5 for n in shape])
    else:
        field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), correlation_vox / 2.0)
    field -= field.mean()
    field /= field.std() + 1e-12
    return field
