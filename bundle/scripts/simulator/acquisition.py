"""What the scanner and the preprocessing do to a noise-free image: coil bias, skull stripping, slice geometry
(thickness, gap, orientation), Rician noise and storage on an arbitrary integer scale."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .interpolation import resample_separable
from .random_fields import smooth_random_field

# Slice axis of each orientation on the RAS-ordered truth grid, and the order in which the acquisition stores its
# axes: in-plane first, slices last, the way DICOM converters write 2D series.
SLICE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
_STORED_AXES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}


@dataclass(frozen=True)
class Geometry:
    """A 2D multi-slice acquisition: square in-plane voxels, slices ``thickness_mm`` thick every
    ``thickness_mm + gap_mm``."""

    orientation: str
    thickness_mm: float
    in_plane_mm: float = 1.0
    gap_mm: float = 0.0

    def __post_init__(self) -> None:
        if self.orientation not in SLICE_AXIS:
            raise ValueError(f"orientation: expected one of {tuple(SLICE_AXIS)}, got {self.orientation!r}")
        if not (self.thickness_mm > 0 and self.in_plane_mm > 0 and self.gap_mm >= 0):
            raise ValueError(f"geometry: expected positive thickness/in-plane size and gap >= 0 mm, got {self}")

    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing along the truth grid's axes (x, y, z)."""
        spacing = [self.in_plane_mm] * 3
        spacing[SLICE_AXIS[self.orientation]] = self.thickness_mm + self.gap_mm
        return tuple(spacing)

    def voxel_size(self) -> tuple[float, float, float]:
        """Voxel size in the stored axis order (what the NIfTI header reports)."""
        spacing = self.spacing_mm()
        return tuple(spacing[a] for a in _STORED_AXES[self.orientation])


def bias_field(shape: tuple[int, int, int], rng: np.random.Generator, voxel_mm: float, strength: float) -> np.ndarray:
    """Smooth multiplicative receive-coil inhomogeneity ``exp(strength * field)`` varying over ~10 cm."""
    return np.exp(strength * smooth_random_field(shape, rng, 100.0 / voxel_mm)).astype(np.float32)


def skull_strip_mask(brain_fraction: np.ndarray, rng: np.random.Generator, voxel_mm: float,
                     cut_shift_mm: float = 0.0) -> np.ndarray:
    """A soft brain mask as brain-extraction tools leave it (see design/sim-to-real.md): the cut lies 0-4 mm inside
    the brain surface, by an amount that varies smoothly over the brain (so the outer CSF band survives in places and
    is removed in others), and the image fades to zero over a 0.5-2 mm rim (partial volume with removed tissue and
    interpolation at the edge), leaving a thin dark shell on every contrast. ``cut_shift_mm`` moves the cut deeper
    (positive) or shallower (negative; ``realism.RealismRanges.strip_shift_mm``) without changing the draws."""
    depth_mm = ndimage.distance_transform_edt(brain_fraction > 0.5) * voxel_mm
    cut_mm = np.clip(rng.uniform(0.5, 2.5) + 1.2 * smooth_random_field(brain_fraction.shape, rng, 40.0 / voxel_mm)
                     + cut_shift_mm, 0.0, 4.0)
    rim_mm = rng.uniform(0.5, 2.0)
    return np.clip((depth_mm - cut_mm) / rim_mm, 0.0, 1.0).astype(np.float32)


def noise_sigma(clean: np.ndarray, wm_fraction: np.ndarray, snr: float) -> float:
    """Noise s.d. that gives ``snr`` = (mean white-matter signal) / sigma, white matter = voxels >= 90% WM."""
    if snr <= 0:
        raise ValueError(f"snr: expected a positive number, got {snr!r}")
    wm = wm_fraction >= 0.9
    if not wm.any():
        raise ValueError("noise: the image holds no white-matter voxel to define the SNR on")
    return float(clean[wm].mean()) / snr


def add_rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise (s.d. ``sigma`` per channel): Rician statistics
    (Gudbjartsson & Patz, MRM 1995, 34:910-914)."""
    real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.hypot(real, imaginary).astype(np.float32)


def _slab_kernel(width_vox: float) -> np.ndarray:
    """Weights of a rectangular slab ``width_vox`` wide centred on a voxel: each neighbour weighs by its overlap."""
    half = width_vox / 2.0
    reach = int(np.ceil(half - 0.5))
    offsets = np.arange(-reach, reach + 1)
    weights = np.clip(np.minimum(offsets + 0.5, half) - np.maximum(offsets - 0.5, -half), 0.0, None)
    return weights / weights.sum()


def acquire_geometry(volume: np.ndarray, affine: np.ndarray, voxel_mm: float, geometry: Geometry):
    """Resample a truth-grid volume to a 2D acquisition's grid; returns ``(data, affine)`` in the stored axis order.

    Each slice averages the truth over its slab (a rectangular slice profile, not point sampling); in-plane voxels
    larger than the truth voxel average with a Gaussian of the voxel's FWHM. The grid is centred on the truth grid's
    field of view and its affine maps every voxel centre to the world point it was sampled at, so the acquisition
    and the truth share world space.
    """
    spacing = geometry.spacing_mm()
    slice_axis = SLICE_AXIS[geometry.orientation]
    blurred = volume.astype(np.float32)
    positions, origin = [], []
    for axis, (n, s) in enumerate(zip(volume.shape, spacing)):
        step = s / voxel_mm
        if axis == slice_axis:
            blurred = ndimage.correlate1d(blurred, _slab_kernel(geometry.thickness_mm / voxel_mm), axis=axis,
                                          mode="constant")
        elif step > 1.0:
            sigma = np.sqrt(step ** 2 - 1.0) / 2.355  # FWHM of the new voxel, less the truth voxel's own
            blurred = ndimage.gaussian_filter1d(blurred, sigma, axis=axis, mode="constant")
        # Slices that fit the truth field of view, with centres inside the truth grid (matters for step < 1).
        count = max(1, min(int(np.floor(n / step)), int(np.floor((n - 1) / step)) + 1))
        first = (n - 1) / 2.0 - (count - 1) / 2.0 * step
        positions.append(first + step * np.arange(count))
        origin.append(first)
    data = resample_separable(blurred, positions)
    order = _STORED_AXES[geometry.orientation]
    index_to_truth = np.zeros((4, 4))
    for stored, truth_axis in enumerate(order):
        index_to_truth[truth_axis, stored] = spacing[truth_axis] / voxel_mm
    index_to_truth[:3, 3] = origin
    index_to_truth[3, 3] = 1.0
    return np.ascontiguousarray(np.transpose(data, order)), affine @ index_to_truth


def to_scanner_scale(image: np.ndarray, rng: np.random.Generator, signed: bool = False) -> np.ndarray:
    """Store as a scanner would: an arbitrary gain putting the 99.9th percentile near 1000-4000, rounded to int16;
    negative values become 0 unless ``signed`` (images resampled after the scanner: realism.py)."""
    top = float(np.percentile(image[image > 0], 99.9)) if (image > 0).any() else 1.0
    gain = rng.uniform(1000.0, 4000.0) / top
    return np.clip(np.rint(image * gain), -32768 if signed else 0, 32767).astype(np.int16)
