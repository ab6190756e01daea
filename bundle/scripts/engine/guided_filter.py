"""Input-guided detail transfer: the synthesized image re-drawn with the input scan's fine structure.

The network was trained on simulated images; on a real scan its prediction is blurred or distorted where the scan's
fine structure (sulci, vessels, lesion edges) looks unlike the simulation, while the input records that structure
exactly. The guided filter (He, Sun and Tang, "Guided Image Filtering", IEEE TPAMI 35(6), 2013) expresses the
prediction, in each small window, as the affine function of the input that fits it best (least squares with a ridge
``eps``) and averages the overlapping windows' functions, so edges come from the input and contrast (including an
inverted one) from the prediction. The filtered values are then replaced rank for rank by the prediction's own values
inside the foreground, so the output keeps the network's intensity distribution and only the spatial order of its
grey levels changes (measured on real and simulated scans: docs/real_data.md). It is skipped where the output grid
is more than ``MAX_UPSAMPLING`` times finer than the input along an axis (super-resolution of thick slices): there the
input has no fine structure to give, only its partial-volume blur, and on the simulated benchmark's thick-slice rows
guidance lowered PSNR.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# Ridge of each window's fit, on the normalised scale (99th percentile = 1): windows whose input varies less than
# sqrt(eps) ~ 0.03 keep the prediction's local mean instead of amplifying noise. Between 1e-4 and 1e-2 the measured
# correlations moved by at most 0.02.
GUIDED_FILTER_EPS = 1e-3
# Float32 volumes of the output grid held at once by ``input_guided``, the rank step's int64 indices counted as two
# (memory checks count them per voxel)
GUIDED_FILTER_VOLUMES = 10
# Largest ratio of output to input voxels along an axis (input voxel size / output voxel size) that is guided
MAX_UPSAMPLING = 1.5


def guides(input_shape: Sequence[int], output_shape: Sequence[int]) -> bool:
    """Whether an input of ``input_shape`` guides a prediction of ``output_shape`` tiling the same field of view:
    no axis of the output more than ``MAX_UPSAMPLING`` times finer than the input's."""
    return all(out <= MAX_UPSAMPLING * given for given, out in zip(input_shape, output_shape))


def _window_sum(volume: torch.Tensor, radius: int) -> torch.Tensor:
    """Sum over the (2 radius + 1)^3 window around every voxel (zeros beyond the edge), up to a constant factor.
    Padded first: pooling refuses an axis shorter than its window (a single slice) even with its own padding."""
    return F.avg_pool3d(F.pad(volume[None, None], [radius] * 6), 2 * radius + 1, stride=1)[0, 0]


def guided_filter(guide: torch.Tensor, signal: torch.Tensor, weight: torch.Tensor, radius: int,
                  eps: float = GUIDED_FILTER_EPS) -> torch.Tensor:
    """``signal`` filtered by ``guide`` (3D tensors of one shape): He et al.'s guided filter, with every window mean
    taken over the voxels where ``weight`` (0 or 1) is set, so the background does not enter the fits."""
    count = _window_sum(weight, radius).clamp_(min=1e-6)

    def window_mean(volume: torch.Tensor) -> torch.Tensor:
        return _window_sum(volume * weight, radius).div_(count)

    guide_mean, signal_mean = window_mean(guide), window_mean(signal)
    slope = (window_mean(guide * signal) - guide_mean * signal_mean).div_(
        window_mean(guide * guide) - guide_mean * guide_mean + eps)
    offset = signal_mean.sub_(slope * guide_mean)
    return window_mean(slope).mul_(guide).add_(window_mean(offset))


def rank_matched(order: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` with its voxels inside ``mask`` re-assigned so that their ranks follow ``order``'s there: the
    result has exactly ``values``' intensities inside the mask (and its voxels outside), arranged as ``order``."""
    result = values.clone()
    by_order = torch.argsort(order[mask])  # the k-th entry: the voxel whose order value is the k-th smallest
    sorted_values = torch.sort(values[mask]).values
    inside = torch.empty_like(sorted_values)
    inside[by_order] = sorted_values
    result[mask] = inside
    return result


def input_guided(image: torch.Tensor, prediction: torch.Tensor, foreground: torch.Tensor, radius: int) -> torch.Tensor:
    """``prediction [1, D, H, W]`` with the fine structure of the normalised input ``image [1, d, h, w]``
    (trilinearly resampled to the prediction's grid as ``foreground_mask`` resamples the mask), inside
    ``foreground [D, H, W]``."""
    guide = image[None].to(prediction.device, prediction.dtype)
    if tuple(guide.shape[2:]) != tuple(prediction.shape[1:]):
        guide = F.interpolate(guide, size=tuple(prediction.shape[1:]), mode="trilinear", align_corners=False)
    filtered = guided_filter(guide[0, 0], prediction[0], foreground.to(prediction.dtype), radius)
    return rank_matched(filtered, prediction[0], foreground)[None]
