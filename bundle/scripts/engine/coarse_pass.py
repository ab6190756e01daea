"""A second, coarse pass: the prediction's low spatial frequencies from the input block-averaged 2x.

Stage 2 trains on inputs whose voxels hold 1 to 4 mm of anatomy (1 mm truth, ``scale_range`` [1, 4]), and on real
scans the network's contrast is measured best from inputs of 2-4 mm: a 1 mm real scan's fine texture and noise look
least like the simulation. So where the input, block-averaged ``COARSE_FACTOR`` times along every axis, still has
voxels of at most ``MAX_COARSE_VOXEL_MM``, the network also runs on that coarse copy (same output grid), and the
output takes its low frequencies (a Gaussian of one coarse voxel's width, averaged over the foreground only) from
the coarse pass and the rest from the full-resolution one: the contrast from where the network reads real scans
best, the detail from the scan. Measured on three real patients and on the simulated benchmark: docs/real_data.md.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

COARSE_FACTOR = 2
# Stage 2's coarsest input voxel: the 1 mm truth grid times scale_range's top (configs/stage2_train.yaml)
MAX_COARSE_VOXEL_MM = 4.0
# Float32 volumes of the output grid held at once besides the prediction: the coarse prediction, and the weights,
# smoothed volumes and temporaries of ``with_coarse_low_frequencies``, counted generously (memory checks count them
# per voxel)
COARSE_PASS_VOLUMES = 8


def coarse_pass_applies(input_spacing: Sequence[float] | None) -> bool:
    """Whether an input of these voxel sizes (mm; None: unknown) gets the coarse pass."""
    return input_spacing is not None and all(COARSE_FACTOR * float(s) <= MAX_COARSE_VOXEL_MM for s in input_spacing)


def block_averaged(image: torch.Tensor) -> torch.Tensor:
    """``image [C, D, H, W]`` averaged over blocks of ``COARSE_FACTOR`` voxels per axis, tiling the same field of
    view (an odd axis gets blocks that overlap by a voxel)."""
    size = [math.ceil(n / COARSE_FACTOR) for n in image.shape[1:]]
    return F.adaptive_avg_pool3d(image[None], size)[0]


def with_coarse_low_frequencies(fine: torch.Tensor, coarse: torch.Tensor, foreground: torch.Tensor,
                                input_shape: Sequence[int]) -> torch.Tensor:
    """``fine [1, D, H, W]`` with its low frequencies replaced by ``coarse``'s (same grid) inside ``foreground``
    (``fine`` as it is outside); the Gaussian's sigma is one coarse input voxel (``input_shape``: the
    full-resolution input's) in output voxels."""
    sigma = [COARSE_FACTOR * out / given for out, given in zip(fine.shape[1:], input_shape)]
    smooth = GaussianFilter(3, sigma).to(fine.device)
    weight = foreground.to(fine.dtype)[None, None]
    norm = smooth(weight).clamp_(min=1e-3)

    def low(volume: torch.Tensor) -> torch.Tensor:
        return smooth(volume[None] * weight).div_(norm)[0]

    return torch.where(foreground, fine + low(coarse) - low(fine), fine)
