"""Smooth random fields: the one source of spatial randomness (deformations, bias fields, skull-strip depth, vessels)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


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
        # Sample the coarse lattice at each fine voxel (trilinear): one map_coordinates per field.
        axes = [np.arange(s, dtype=np.float32) / step + 0.5 for s in shape]
        grid = np.meshgrid(*axes, indexing="ij", sparse=False)
        field = ndimage.map_coordinates(coarse, grid, order=1, output=np.float32)
    else:
        field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), correlation_vox / 2.0)
    field -= field.mean()
    field /= field.std() + 1e-12
    return field
