"""Image-quality measures for evaluation: everything is computed inside the brain, on normalised intensities.

Normalisation (stated in every output table): each image is divided by the 99th percentile of its brain voxels and
clipped to [0, 1.5] (``scripts.data.intensity``); PSNR uses a data range of 1.0 over brain voxels; SSIM is MONAI's
3D SSIM (Gaussian window 11, sigma 1.5, data range 1.0) over the brain's bounding box with the background set to 0.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import SSIMMetric

from scripts.data.intensity import normalize_intensity

DATA_RANGE = 1.0
LUT_BINS = 256


def _crop_to_mask(mask: np.ndarray, *volumes: np.ndarray) -> list[np.ndarray]:
    indices = np.argwhere(mask)
    low, high = indices.min(0), indices.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(low, high))
    return [v[box] for v in volumes]


def psnr(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """PSNR in dB over the voxels of ``mask`` (data range 1.0)."""
    error = float(np.mean((prediction[mask] - target[mask]) ** 2))
    return float("inf") if error == 0 else 10.0 * np.log10(DATA_RANGE**2 / error)


def ssim(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """3D SSIM over the brain's bounding box, background zeroed in both images."""
    pred, ref, inside = _crop_to_mask(mask, prediction * mask, target * mask, mask)
    shape = [max(s, 11) for s in pred.shape]  # the 11-voxel window needs at least 11 voxels per axis
    pad = [(0, s - n) for s, n in zip(shape, pred.shape)]
    pred, ref = np.pad(pred, pad), np.pad(ref, pad)
    metric = SSIMMetric(spatial_dims=3, data_range=DATA_RANGE)
    value = metric(torch.from_numpy(pred)[None, None].float(), torch.from_numpy(ref)[None, None].float())
    return float(value.mean())


def pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of the voxels inside ``mask``."""
    return float(np.corrcoef(a[mask].astype(np.float64), b[mask].astype(np.float64))[0, 1])


def oracle_lookup_table(source: np.ndarray, target: np.ndarray, mask: np.ndarray, bins: int = LUT_BINS) -> np.ndarray:
    """The best voxel-wise intensity mapping: each source quantile bin -> the mean target of that bin.

    Fitted on the answer itself, so it is an upper bound for any method that only remaps grey levels; a model that
    beats it uses anatomy and context.
    """
    values = source[mask]
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)))
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    sums = np.bincount(index, weights=target[mask], minlength=len(edges) - 1)
    counts = np.bincount(index, minlength=len(edges) - 1)
    means = sums / np.maximum(counts, 1)
    mapped = np.zeros_like(target, dtype=np.float32)
    mapped[mask] = means[index]
    return mapped


def tissue_volumes(image: np.ndarray, mask: np.ndarray, voxel_volume_ml: float, iterations: int = 50) -> np.ndarray:
    """Volumes (mL) of three intensity classes (darkest to brightest) by 1D k-means inside the brain.

    On a T1w image the classes are CSF, grey matter and white matter: a downstream check in the spirit of the
    paper's Table 2 (volumes from synthesized vs real images).
    """
    values = image[mask].astype(np.float64)
    low, high = np.quantile(values, [0.01, 0.99])
    centres = np.linspace(low, high, 3)  # evenly spread: quantile starts collapse when one class dominates
    for _ in range(iterations):
        labels = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        updated = np.array([values[labels == k].mean() if np.any(labels == k) else centres[k] for k in range(3)])
        if np.allclose(updated, centres):
            break
        centres = updated
    labels = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
    order = np.argsort(centres)
    return np.array([np.sum(labels == k) for k in order], dtype=np.float64) * voxel_volume_ml


def compare(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """PSNR, SSIM and Pearson r of a prediction against its target, both normalised the same way."""
    region = (target != 0) if mask is None else mask.astype(bool)
    pred = normalize_intensity(np.asarray(prediction, np.float32), region)
    ref = normalize_intensity(np.asarray(target, np.float32), region)
    return {"psnr": psnr(pred, ref, region), "ssim": ssim(pred, ref, region), "pearson": pearson(pred, ref, region)}
