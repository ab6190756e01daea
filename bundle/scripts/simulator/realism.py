"""Opt-in realism: per-subject tissue-parameter ranges and the real-scan artefacts the clean simulation lacks,
calibrated on a real case (docs/sim_vs_real.md).

The default simulation calls none of this, so the held-out evaluation subjects (seed 1000) and the thresholds
measured on them stay as they are. With ``simulate(..., realism=True)`` every subject draws, from a generator of its
own (so its anatomy and protocols stay those of the clean subject):

- ``vary_tissue``: T1 and T2/T2* scaled by a subject factor and a smaller per-class one, PD per class, within the
  spread between published measurements at one field strength (the clean simulation jitters by 3 % around one
  table). The prompt's
  TR/TE/TI/FA still set the contrast through the signal equations; only the tissues they act on vary;
- ``magnetisation_transfer`` on the multi-slice turbo-spin-echo contrasts (T2w, PD, FLAIR): the pulses of the
  other slices saturate macromolecule-bound water, lowering WM and GM but not CSF (real T2w: CSF fills the
  99th percentile at 3.5 x the parenchyma peak, the single-slice equations give at most ~3);
- a skull-strip cut moved outwards or inwards (``strip_shift_mm``): on some real scans a bright CSF band survives
  under a thin dark shell (T2w rim 1.30 x the brain median), on others the cut lies deeper (sim-to-real.md);
- ``calibrate``, per image: vessel- and fat-like bright blobs (``bright_tail``: real T1w white-matter peak at 0.51 of
  its 99th percentile, clean simulation 0.62-0.92), truncated k-space (``gibbs_ringing``: an acquisition matrix
  coarser than the grid, ringing at every sharp edge), motion during part of the phase encoding
  (``motion_ghosting``: ghosts along the phase-encode axis), clinical 2D slices averaged and resampled back to the
  grid (``thick_slice_resampling``: real z/xy neighbour-difference ratio 0.56-0.76 vs ~1.0), resampling by a
  registration's cubic kernel (``registration_resampling``: over- and undershoot, the small negative values of the
  real case's int16 images), 8-bit storage (``quantise``) and an arbitrary intensity scale (normalisation must undo
  it). With realism the images are stored as signed int16, so the negative values survive.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .interpolation import cubic_interpolation_matrix, resample_separable
from .random_fields import smooth_random_field
from .tissue import TissueProperties


@dataclass(frozen=True)
class RealismRanges:
    """Uniform ranges of each variation and artefact; the probability that an optional step is applied at all."""

    # Relaxation factors exp(U(-s, s)): one for the whole subject's tissue (the spread between studies is mostly a
    # method and scanner offset common to all tissues, from their differing sensitivity to the macromolecular pool:
    # Stikov et al., MRM 2015, 73:514-522; free water such as CSF lacks that pool and keeps its class factor only)
    # times a smaller one per tissue class. Normal-brain T1 at one field strength differs by about +-15 % between
    # studies: 3 T WM 832 (Wansapura et al., JMRI 1999, 9:531-538) to 1084 ms (Stanisz et al., MRM 2005,
    # 54:507-512), cortex 1331 to 1820 ms; 1.5 T WM 790 (Rooney et al., MRM 2007, 57:308-318) to 884 ms (Stanisz).
    # The GM/WM T1 ratio is steadier (1.52 Rooney, 1.60-1.68 at 3 T): +-5 % per class keeps it within about +-10 %
    # (a larger spread would flatten 1.5 T T1w contrast, which real scans do not show). T2 by about +-10 % (3 T WM
    # 69-80 ms, GM 95-110 ms: Stanisz 2005, Wansapura 1999; CSF 1500-2000+ ms: design/mr-physics.md). Water content
    # (PD) by a few percent per class (Tofts (ed.), Quantitative MRI of the Brain, 2003). Normal WM and GM keep an
    # intact blood-brain barrier and barely enhance, so T1CE WM/GM contrast varies with these T1s, as T1w does.
    t1_spread: float = 0.15
    t1_class_spread: float = 0.05
    t2_spread: float = 0.10
    t2_class_spread: float = 0.04
    pd_class_spread: float = 0.03
    # Incidental magnetisation transfer: the off-resonant pulses of the other slices of a 2D multi-slice (turbo) spin
    # echo saturate the bound pool (Dixon et al., MRI 1990, 8:417-422; Melki & Mulkern, MRM 1992, 24:189-195); the
    # in-vivo brain MT ratio of a multi-slice multi-echo protocol against a single-slice spin echo is ~19-21 %
    # (Radunsky et al., Magn Reson Med, PMC7053148: 21.2 % with an inter-slice gap, 18.9 % with more slices),
    # higher in WM than on average; 3D and few-slice protocols lose less, hence a range from 0.
    mt_saturation: tuple[float, float] = (0.0, 0.35)
    strip_shift_mm: tuple[float, float] = (-1.5, 1.0)  # added to the skull-strip cut depth (negative: shallower)
    tail_fraction: tuple[float, float] = (0.005, 0.04)  # of brain voxels; above 1 % it reaches the 99th percentile
    tail_level: tuple[float, float] = (1.5, 3.5)  # x the bright-half median (real T1w tail: ~2x the WM peak)
    slice_thickness_mm: tuple[int, int] = (3, 8)  # clinical 2D: 3-6 mm slices plus gaps
    thick_slice_probability: float = 0.5
    # Truncation ringing (Kellner et al., MRM 2016, 76:1574-1581): the share of the grid's k-space extent acquired
    # along each in-plane axis, i.e. an acquired voxel 1-1.7 x the grid's, reconstructed without a filter.
    kspace_fraction: tuple[float, float] = (0.6, 1.0)
    gibbs_probability: float = 0.5
    # Rigid motion during part of the phase encoding (Wood & Henkelman, Med. Phys. 1985, 12:143-151): that share of
    # the k-space lines sees the head displaced by up to that many voxels along the phase-encode axis.
    motion_lines: tuple[float, float] = (0.02, 0.2)
    motion_shift_vox: tuple[float, float] = (0.5, 3.0)
    motion_probability: float = 0.3
    resampling_probability: float = 0.5  # registered to an atlas by a cubic kernel (sub-voxel shifts)
    quantise_probability: float = 0.2
    scale: tuple[float, float] = (0.01, 5000.0)  # log-uniform


FREE_WATER = ("CSF",)


def vary_tissue(properties: dict[str, TissueProperties], rng: np.random.Generator,
                ranges: RealismRanges = RealismRanges()) -> dict[str, TissueProperties]:
    """``properties`` with T1 and T2 (T2* with it) scaled by a subject factor (not ``FREE_WATER``) times a class
    factor, and PD by a class factor (at most 1)."""
    subject = np.exp(rng.uniform(-1.0, 1.0, 2) * (ranges.t1_spread, ranges.t2_spread))
    varied = {}
    for name in properties:  # a fixed order of draws: the class order of ``TISSUES``
        p = properties[name]
        t1, t2 = (1.0, 1.0) if name in FREE_WATER else subject
        spreads = (ranges.t1_class_spread, ranges.t2_class_spread, ranges.pd_class_spread)
        f1, f2, fpd = np.exp(rng.uniform(-1.0, 1.0, 3) * spreads)
        varied[name] = replace(p, t1=p.t1 * t1 * f1, t2=p.t2 * t2 * f2, t2star=p.t2star * t2 * f2,
                               pd=min(1.0, p.pd * fpd))
    return varied


MT_MODALITIES = ("T2w", "PD", "FLAIR")
# Share of the saturation each class takes: grey matter's MT ratio is about 0.7 x white matter's (Tofts (ed.),
# Quantitative MRI of the Brain, 2003); fluid (CSF, blood) has no bound pool, and lesions (more free water) are
# left out rather than guessed.
MT_WEIGHT = {"WM": 1.0, "cGM": 0.7, "dGM": 0.7}


def magnetisation_transfer(properties: dict[str, TissueProperties], saturation: float
                           ) -> dict[str, TissueProperties]:
    """``properties`` with the signal of each class of ``MT_WEIGHT`` lowered by ``saturation`` x its weight (through
    PD, on which every signal equation is linear: a first-order model of the bound-pool saturation)."""
    return {name: replace(p, pd=p.pd * (1.0 - MT_WEIGHT.get(name, 0.0) * saturation))
            for name, p in properties.items()}


def bright_tail(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, fraction: float,
                level: float) -> np.ndarray:
    """``image`` with about ``fraction`` of the brain voxels raised towards ``level`` x the median of the brain's
    bright half, in blobs 1-2 voxels wide (vessels, fat, enhancing tissue); each blob's centre is brightest, and the
    heights spread evenly from 1 to ``level`` x (a tail of values, not one spike)."""
    field = smooth_random_field(image.shape, rng, 2.0)
    threshold = np.quantile(field[mask], 1.0 - fraction)
    blobs = mask & (field > threshold)
    values = image[mask]
    reference = float(np.median(values[values >= np.median(values)]))
    rank = np.argsort(np.argsort(field[blobs]))  # uniform spread of heights from 1 to ``level`` x the reference
    height = 1.0 + (level - 1.0) * rank / max(rank.size - 1, 1)
    out = image.copy()
    out[blobs] = np.maximum(out[blobs], height * reference)
    return out


def _along(vector: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """``vector`` shaped to broadcast along ``axis`` of an ``ndim``-dimensional array (one factor per frequency)."""
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def gibbs_ringing(image: np.ndarray, axes: tuple[int, ...], kspace_fraction: float) -> np.ndarray:
    """The magnitude image of ``image``'s spectrum cut, along each of ``axes``, to the central ``kspace_fraction`` of
    its frequencies (no apodisation): what a coarser acquisition matrix zero-filled to this grid gives."""
    spectrum = np.fft.fftn(image, axes=axes)
    for axis in axes:
        spectrum *= _along(np.abs(np.fft.fftfreq(image.shape[axis])) <= 0.5 * kspace_fraction, axis, image.ndim)
    return np.abs(np.fft.ifftn(spectrum, axes=axes)).astype(np.float32)


def motion_ghosting(image: np.ndarray, axis: int, lines: np.ndarray, shift_vox: float) -> np.ndarray:
    """The magnitude image when the k-space ``lines`` (bool per frequency along ``axis``, the phase-encode axis) are
    acquired with the head shifted by ``shift_vox`` voxels along that axis: the shift theorem's phase ramp on those
    lines only, so their share of the signal reappears as ghosts along the axis."""
    spectrum = np.fft.fft(image, axis=axis)
    ramp = np.where(lines, np.exp(-2j * np.pi * np.fft.fftfreq(image.shape[axis]) * shift_vox), 1.0)
    return np.abs(np.fft.ifft(spectrum * _along(ramp, axis, image.ndim), axis=axis)).astype(np.float32)


def registration_resampling(image: np.ndarray, shift_vox: tuple[float, ...]) -> np.ndarray:
    """``image`` moved by a sub-voxel ``shift_vox`` per axis with cubic convolution, as a registration to an atlas
    resamples it: the kernel's negative lobes undershoot below dark neighbours of bright tissue (values below 0)."""
    positions = [np.arange(n) - shift for n, shift in zip(image.shape, shift_vox)]
    return resample_separable(image, positions, kernel=cubic_interpolation_matrix)


def thick_slice_resampling(image: np.ndarray, axis: int, thickness_vox: int) -> np.ndarray:
    """Average ``thickness_vox`` neighbouring slices along ``axis`` into one and interpolate linearly back."""
    n = image.shape[axis]
    count = max(1, n // thickness_vox)
    trimmed = np.take(image, np.arange(count * thickness_vox), axis=axis)
    shape = list(image.shape)
    shape[axis:axis + 1] = [count, thickness_vox]
    slabs = trimmed.reshape(shape).mean(axis=axis + 1)
    centres = (np.arange(n) - (thickness_vox - 1) / 2.0) / thickness_vox  # fine voxel -> slab index
    positions = [np.arange(size, dtype=np.float64) for size in slabs.shape]
    positions[axis] = np.clip(centres, 0, count - 1)
    return resample_separable(slabs, positions).astype(np.float32)


def quantise(image: np.ndarray, levels: int = 256) -> np.ndarray:
    """``image`` stored in ``levels`` grey levels (8 bit, unsigned: negative values become 0), on its own maximum."""
    top = float(image.max())
    if top <= 0:
        return image
    return (np.clip(np.round(image / top * (levels - 1)), 0, levels - 1) * (top / (levels - 1))).astype(np.float32)


def calibrate(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, slice_axis: int = 2,
              ranges: RealismRanges = RealismRanges(), voxel_mm: float = 1.0) -> np.ndarray:
    """One random draw of every real-scan artefact above, applied to a simulated image on a ``voxel_mm`` grid
    (background stays 0; the skull stripping, ``mask``, comes after the acquisition): the in-plane axes are the
    two other than ``slice_axis``."""
    out = bright_tail(image, mask, rng, rng.uniform(*ranges.tail_fraction), rng.uniform(*ranges.tail_level))
    in_plane = tuple(axis for axis in range(out.ndim) if axis != slice_axis)
    if rng.random() < ranges.gibbs_probability:
        out = gibbs_ringing(out, in_plane, rng.uniform(*ranges.kspace_fraction)) * mask
    if rng.random() < ranges.motion_probability:
        axis = in_plane[int(rng.integers(len(in_plane)))]
        lines = rng.random(out.shape[axis]) < rng.uniform(*ranges.motion_lines)
        out = motion_ghosting(out, axis, lines, rng.uniform(*ranges.motion_shift_vox)) * mask
    if rng.random() < ranges.thick_slice_probability:
        thickness_mm = int(rng.integers(ranges.slice_thickness_mm[0], ranges.slice_thickness_mm[1] + 1))
        thickness_vox = int(round(thickness_mm / voxel_mm))
        if thickness_vox > 1:
            out = thick_slice_resampling(out, slice_axis, thickness_vox) * mask
    if rng.random() < ranges.resampling_probability:
        out = registration_resampling(out, tuple(rng.uniform(-0.5, 0.5, out.ndim))) * mask
    if rng.random() < ranges.quantise_probability:
        out = quantise(out)
    return (out * np.exp(rng.uniform(*np.log(ranges.scale)))).astype(np.float32)
