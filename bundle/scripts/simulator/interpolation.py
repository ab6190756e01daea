"""Separable linear interpolation as small matrices: resampling a volume on an axis-aligned grid costs three
matrix products instead of a per-voxel ``map_coordinates``."""

from __future__ import annotations

import numpy as np


def linear_interpolation_matrix(positions: np.ndarray, n_source: int) -> np.ndarray:
    """``[len(positions), n_source]`` weights that linearly interpolate samples 0..n_source-1 at ``positions``
    (index units); positions outside the samples read zero beyond the edge (a zero-padded volume)."""
    positions = np.asarray(positions, dtype=np.float64)
    low = np.floor(positions).astype(int)
    frac = positions - low
    weights = np.zeros((len(positions), n_source))
    rows = np.arange(len(positions))
    for index, weight in ((low, 1.0 - frac), (low + 1, frac)):
        inside = (index >= 0) & (index < n_source)
        weights[rows[inside], index[inside]] = weight[inside]
    return weights


def cubic_interpolation_matrix(positions: np.ndarray, n_source: int, a: float = -0.5) -> np.ndarray:
    """``[len(positions), n_source]`` weights of cubic convolution (Keys, IEEE Trans. Acoust. Speech Signal Process.
    1981, 29:1153-1160; ``a = -0.5``): four samples per position, with negative side lobes, so a step over- and
    undershoots as registration software's cubic and sinc resamplers do; zero beyond the edge."""
    positions = np.asarray(positions, dtype=np.float64)
    low = np.floor(positions).astype(int)
    weights = np.zeros((len(positions), n_source))
    rows = np.arange(len(positions))
    for offset in (-1, 0, 1, 2):
        index = low + offset
        distance = np.abs(positions - index)
        weight = np.where(distance <= 1, ((a + 2) * distance - (a + 3)) * distance**2 + 1,
                          ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a)
        inside = (index >= 0) & (index < n_source)
        weights[rows[inside], index[inside]] += weight[inside]
    return weights


def resample_separable(volume: np.ndarray, positions: list[np.ndarray], kernel=linear_interpolation_matrix
                       ) -> np.ndarray:
    """``volume`` sampled at the outer product of per-axis index ``positions`` (``kernel``: the per-axis weights,
    linear by default)."""
    out = volume
    for axis, pos in enumerate(positions):
        out = np.moveaxis(np.tensordot(kernel(pos, volume.shape[axis]), out, axes=([1], [axis])), 0, axis)
    return out.astype(np.float32)
