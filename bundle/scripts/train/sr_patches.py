"""Stage-2 training samples: a high-res patch, its clinically degraded low-res version, and random query points.

Geometry (all in high-res voxel units, patch-relative): the patch holds ``P`` voxels per axis, the low-res input ``n``
voxels, so one low-res voxel spans ``P / n`` high-res voxels and its centre sits at ``(i + 0.5) * P / n``. A low-res
voxel is not a point sample: it averages the high-res signal over its slab with a slice profile (box, or a Gaussian
whose FWHM is the slice thickness), as an MR slice-selective excitation does (the slice profile is approximately the
Fourier transform of the RF pulse: Bernstein et al., Handbook of MRI Pulse Sequences, 2004, ch. 2). Query points
``x`` (voxel-centre index coordinates in the patch) map to the network's normalised coordinates of the low-res patch
as ``-1 + 2 (x + 0.5) / P`` (voxel centres, align_corners=False, see scripts.nets.liif.make_coord); the cell of one
high-res output voxel is ``2 / P``.

The low-res input size ``n`` is fixed so samples of different scales batch together; the patch size follows as
``P = round(n * scale)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable
from scipy.ndimage import map_coordinates
from scipy.special import erf

from ..errors import config_flag

PROFILES = ("box", "gaussian")
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_BRAIN_QUERY_CANDIDATES = 4  # uniform points drawn per brain query wanted (a patch centred in the brain: mostly brain)
_CENTRE_CANDIDATES = 64  # random voxels tried per foreground patch centre (a brain of 5 % misses all 64 with p = 4 %)


@dataclass(frozen=True)
class PatchGeometry:
    start: tuple[int, int, int]  # high-res index of the patch's first voxel (may be negative: zero padding)
    hr_size: tuple[int, int, int]  # P per axis
    lr_size: tuple[int, int, int]  # n per axis
    thickness: tuple[float, float, float]  # width of each low-res voxel's slab, in high-res voxels

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(p / n for p, n in zip(self.hr_size, self.lr_size))


def hr_patch_size(lr_size, scale) -> tuple[int, ...]:
    """High-res patch size covering a low-res input of ``lr_size`` voxels at ``scale`` high-res voxels per voxel."""
    return tuple(max(n, int(round(n * s))) for n, s in zip(lr_size, scale))


def _check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"slice profile: expected one of {PROFILES}, got {profile!r}")
    return profile


def _margin(thickness: float, profile: str) -> int:
    """High-res voxels needed beyond the patch so every slab (Gaussian: +-3 sigma) lies inside the read region."""
    reach = 3.0 * thickness / FWHM_PER_SIGMA if profile == "gaussian" else 0.5 * thickness
    return int(math.ceil(reach)) + 1


def slab_weights(lr_size: int, hr_size: int, thickness: float, profile: str, margin: int) -> np.ndarray:
    """``[lr_size, hr_size + 2 margin]``: each row averages the high-res voxels (read with ``margin`` on each side)
    under one low-res voxel's slice profile, each voxel weighted by the profile's integral over it."""
    centres = (np.arange(lr_size) + 0.5) * (hr_size / lr_size) + margin
    edges = np.arange(hr_size + 2 * margin + 1, dtype=np.float64)
    if _check_profile(profile) == "box":
        low, high = centres[:, None] - thickness / 2, centres[:, None] + thickness / 2
        weights = np.clip(np.minimum(high, edges[None, 1:]) - np.maximum(low, edges[None, :-1]), 0.0, None)
    else:
        sigma = thickness / FWHM_PER_SIGMA
        cdf = 0.5 * (1.0 + erf((edges[None, :] - centres[:, None]) / (sigma * math.sqrt(2.0))))
        weights = np.diff(cdf, axis=1)
    return weights / weights.sum(axis=1, keepdims=True)


def crop_zero_padded(volume: np.ndarray, start, size) -> np.ndarray:
    """``volume[start : start + size]`` per axis, zeros where the box leaves the volume."""
    out = np.zeros(tuple(size), dtype=np.float32)
    source, target = [], []
    for begin, length, extent in zip(start, size, volume.shape):
        low, high = max(begin, 0), min(begin + length, extent)
        if high <= low:
            return out
        source.append(slice(low, high))
        target.append(slice(low - begin, high - begin))
    out[tuple(target)] = volume[tuple(source)]
    return out


def degrade(volume: np.ndarray, geometry: PatchGeometry, profile: str = "gaussian") -> np.ndarray:
    """The low-res patch ``[n0, n1, n2]`` a scanner with this geometry would record of ``volume`` (separable)."""
    margins = [_margin(w, profile) for w in geometry.thickness]
    region = crop_zero_padded(volume, [s - m for s, m in zip(geometry.start, margins)],
                              [p + 2 * m for p, m in zip(geometry.hr_size, margins)]).astype(np.float64)
    for axis in range(3):
        weights = slab_weights(geometry.lr_size[axis], geometry.hr_size[axis], geometry.thickness[axis], profile,
                               margins[axis])
        region = np.moveaxis(np.tensordot(weights, region, axes=(1, axis)), 0, axis)
    return region.astype(np.float32)


def query(targets: list[np.ndarray], geometry: PatchGeometry, points: np.ndarray) -> dict[str, torch.Tensor]:
    """Network inputs and targets for patch-relative high-res index coordinates ``points [N, 3]``.

    ``label [N, K]`` holds the K ``targets`` trilinearly interpolated at the points (zero outside the volume).
    """
    size = np.asarray(geometry.hr_size, dtype=np.float64)
    coords = -1.0 + 2.0 * (points + 0.5) / size
    where = (points + np.asarray(geometry.start)).T
    values = [map_coordinates(target, where, order=1, mode="constant", cval=0.0) for target in targets]
    return {
        "coords": torch.as_tensor(coords, dtype=torch.float32),
        "cell": torch.as_tensor(np.broadcast_to(2.0 / size, points.shape).copy(), dtype=torch.float32),
        "label": torch.as_tensor(np.stack(values, axis=1), dtype=torch.float32),
    }


def _sample(source: np.ndarray, targets: list[np.ndarray], geometry: PatchGeometry, points: np.ndarray,
            profile: str) -> dict:
    return {
        "image": torch.as_tensor(degrade(source, geometry, profile))[None],
        **query(targets, geometry, points),
        "patch_start": torch.tensor(geometry.start),
        "patch_size": torch.tensor(geometry.hr_size),
    }


class RandSRPatchesd(Randomizable, MapTransform):
    """From a subject's stack of co-registered contrasts ``[M, D, H, W]`` (key ``keys[0]``), ``num_samples`` samples,
    each of a random ordered (source, target) pair, a random clinical acquisition and a random patch location.

    Acquisition: with probability ``anisotropic_prob`` a 2D-like scan (a random slice axis gets a spacing drawn
    from ``scale_range`` and a slice thickness of spacing x ``thickness_ratio_range``; the in-plane axes a spacing
    from ``inplane_scale_range``), otherwise an isotropic one of one random scale. Each item also needs ``tokens
    [M, L]``, ``modalities [M]``, ``prompts`` (per contrast), and yields ``image [1, *lr_size]``, ``coords``,
    ``cell``, ``label`` (``[num_queries, 3|3|1]``), the target's ``tokens``/``modality``/``prompt``,
    ``input_modality``, ``patch_start`` and ``patch_size``.

    ``tasks`` (a task-specific model): the (source, target) modality-index pairs allowed, drawn uniformly among those
    the subject has; None draws any ordered pair (and the random stream is the same as without the option).

    ``same_contrast_prob`` (without ``tasks``): the share of samples whose target is the source's own contrast, i.e.
    super-resolution of one contrast. Without them the network never sees a target of its input's contrast, and
    asked to upsample a scan in its own contrast it returned an image further from the truth than trilinear
    interpolation of the input (docs/small_model_measurements.md). 0 draws as before the option.

    ``native_prob``: the share of samples whose input keeps the truth grid (scale 1 on every axis): the ~1 mm scans
    users bring, which a draw from ``scale_range`` alone rarely gives. 0 draws as before the option.

    ``brain_queries``: the query points lie in the brain (non-zero voxels of the source on the truth grid), not
    anywhere in the patch. Inference keeps only the brain (``scripts.engine.inference_engine``); uniform points also
    fall on the background around a degraded input's blurred edge, where a dark input has a dark target (unlike the
    dark CSF of an MPRAGE, bright on a T2w). Measured, it brightens the CSF a T1w -> T2w gives but does not raise
    the validation mean (bench/README.md, "Loss points in the brain only"), so it is off by default. A patch with
    too little brain fills its points by drawing its brain points again; one with none keeps uniform points.

    ``num_targets`` > 1 (without ``tasks``; ``same_contrast_prob`` is then unused): each sample holds that many targets
    of one input, the subject's contrasts in random order (repeated when it has fewer), with ``label [num_queries, K]``
    and the targets' ``tokens [K, L]``, ``modality [K]`` and ``prompt`` (a list): what
    ``TUMSynNet.forward_targets`` trains on. 1 gives the single-target items above.
    """

    def __init__(self, keys="images", lr_size=(20, 20, 20), num_samples: int = 1, num_queries: int = 4096,
                 scale_range=(1.0, 4.0), anisotropic_prob: float = 0.5, inplane_scale_range=(1.0, 1.5),
                 thickness_ratio_range=(0.8, 1.2), profile: str = "gaussian", foreground_prob: float = 0.9,
                 tasks=None, same_contrast_prob: float = 0.0, native_prob: float = 0.0, num_targets: int = 1,
                 brain_queries: bool | str = False):
        MapTransform.__init__(self, keys)
        self.brain_queries = config_flag(brain_queries, "brain_queries")  # '--brain_queries false' is a string
        self.num_targets = int(num_targets)
        if self.num_targets < 1 or (self.num_targets > 1 and tasks is not None):
            raise ValueError(f"RandSRPatchesd: num_targets must be >= 1, and 1 with tasks; got {num_targets}")
        for name, share in (("same_contrast_prob", same_contrast_prob), ("native_prob", native_prob)):
            if not 0.0 <= float(share) <= 1.0:
                raise ValueError(f"RandSRPatchesd: {name} must lie in [0, 1], got {share}")
        self.same_contrast_prob = float(same_contrast_prob)
        self.native_prob = float(native_prob)
        self.tasks = None if tasks is None else {(int(s), int(t)) for s, t in tasks}
        self.lr_size = tuple(int(n) for n in lr_size)
        self.num_samples, self.num_queries = int(num_samples), int(num_queries)
        self.scale_range, self.inplane_scale_range = tuple(scale_range), tuple(inplane_scale_range)
        self.anisotropic_prob, self.thickness_ratio_range = float(anisotropic_prob), tuple(thickness_ratio_range)
        self.profile = _check_profile(profile)
        self.foreground_prob = float(foreground_prob)
        if len(self.lr_size) != 3 or min(self.scale_range) < 1 or min(self.inplane_scale_range) < 1:
            raise ValueError(f"RandSRPatchesd: expected a 3D lr_size and scales >= 1, got lr_size {lr_size}, "
                             f"scale_range {scale_range}, inplane_scale_range {inplane_scale_range}")

    def _centre(self, target: np.ndarray) -> np.ndarray:
        """A random patch centre: with ``foreground_prob`` a voxel of the target's brain (non-zero), else anywhere.

        Uniform patches of a whole-head grid are mostly background, which teaches little; centring most patches in
        the brain spends the steps on tissue contrast (background and the brain edge still appear around them).
        """
        shape = np.asarray(target.shape)
        if self.R.rand() < self.foreground_prob:
            # Rejection sampling is uniform over the brain without listing it: np.flatnonzero of the whole volume
            # for every patch was most of a training step's data time (bench/README.md).
            candidates = (self.R.rand(_CENTRE_CANDIDATES, 3) * shape).astype(int)
            inside = np.flatnonzero(target[tuple(candidates.T)])
            if inside.size:
                return candidates[inside[0]]
            brain = np.flatnonzero(target)  # a brain too small for the candidates to hit: list it after all
            if brain.size:
                return np.asarray(np.unravel_index(brain[self.R.randint(brain.size)], target.shape))
        return (self.R.rand(3) * shape).astype(int)

    def _points(self, source: np.ndarray, geometry: PatchGeometry) -> np.ndarray:
        """``num_queries`` patch-relative high-res index coordinates, uniform over the patch or its brain."""
        size = np.asarray(geometry.hr_size)
        if not self.brain_queries:
            return self.R.uniform(-0.5, size - 0.5, size=(self.num_queries, 3))
        candidates = self.R.uniform(-0.5, size - 0.5, size=(_BRAIN_QUERY_CANDIDATES * self.num_queries, 3))
        voxels = np.rint(candidates).astype(int) + np.asarray(geometry.start)
        within = np.all((voxels >= 0) & (voxels < np.asarray(source.shape)), axis=1)
        inside = np.flatnonzero(within)[source[tuple(voxels[within].T)] != 0]
        if inside.size == 0:
            return candidates[: self.num_queries]
        if inside.size < self.num_queries:
            inside = inside[self.R.randint(inside.size, size=self.num_queries)]
        return candidates[inside[: self.num_queries]]

    def _task_pairs(self, data) -> list[tuple[int, int]] | None:
        """The subject's channel pairs of an allowed task, or None when any pair is allowed."""
        if self.tasks is None:
            return None
        modalities = [int(m) for m in data["modalities"]]
        pairs = [(s, t) for s, source in enumerate(modalities) for t, target in enumerate(modalities)
                 if s != t and (source, target) in self.tasks]
        if not pairs:
            raise ValueError(f"RandSRPatchesd: subject {data.get('subject')!r} has no (source, target) pair of the "
                             f"allowed tasks {sorted(self.tasks)} among its modalities {modalities}")
        return pairs

    def randomize(self, volume_shape, centre=None) -> PatchGeometry:
        if self.native_prob and self.R.rand() < self.native_prob:
            slice_axis, scale = None, [1.0] * 3
        elif self.R.rand() < self.anisotropic_prob:
            slice_axis = self.R.randint(3)
            scale = [self.R.uniform(*self.inplane_scale_range) for _ in range(3)]
            scale[slice_axis] = self.R.uniform(*self.scale_range)
        else:
            slice_axis, scale = None, [self.R.uniform(*self.scale_range)] * 3
        hr_size = hr_patch_size(self.lr_size, scale)
        thickness = [p / n for p, n in zip(hr_size, self.lr_size)]
        if slice_axis is not None:
            thickness[slice_axis] *= self.R.uniform(*self.thickness_ratio_range)
        if centre is None:  # a patch larger than the volume is centred with random jitter into the zero background
            start = tuple(int(self.R.randint(min(0, d - p), max(0, d - p) + 1)) for d, p in zip(volume_shape, hr_size))
        else:  # around the centre, kept inside the volume where it fits
            start = tuple(int(np.clip(c - p // 2, min(0, d - p), max(0, d - p)))
                          for c, p, d in zip(centre, hr_size, volume_shape))
        return PatchGeometry(start, hr_size, self.lr_size, tuple(thickness))

    def __call__(self, data) -> list[dict]:
        volumes = np.asarray(data[self.keys[0]], dtype=np.float32)
        if volumes.ndim != 4 or volumes.shape[0] < 2:
            raise ValueError(f"RandSRPatchesd: expected a stack of >= 2 contrasts [M, D, H, W] under "
                             f"{self.keys[0]!r}, got shape {volumes.shape}")
        pairs = self._task_pairs(data)
        samples = []
        for _ in range(self.num_samples):
            if self.num_targets > 1:
                samples.append(self._multi_target_sample(data, volumes))
                continue
            if pairs is not None:
                source, target = pairs[self.R.randint(len(pairs))]
            elif self.same_contrast_prob and self.R.rand() < self.same_contrast_prob:
                source = target = self.R.randint(volumes.shape[0])  # super-resolution of one contrast
            else:
                source, target = self.R.choice(volumes.shape[0], size=2, replace=False)
            geometry = self.randomize(volumes.shape[1:], self._centre(volumes[target]))
            points = self._points(volumes[source], geometry)
            sample = _sample(volumes[source], [volumes[target]], geometry, points, self.profile)
            sample.update(tokens=data["tokens"][target], modality=data["modalities"][target],
                          input_modality=data["modalities"][source], prompt=data["prompts"][target],
                          subject=data["subject"])
            samples.append(sample)
        return samples

    def _multi_target_sample(self, data, volumes: np.ndarray) -> dict:
        count = volumes.shape[0]
        source = self.R.randint(count)
        order = np.concatenate([self.R.permutation(count) for _ in range(-(-self.num_targets // count))])
        targets = [int(t) for t in order[: self.num_targets]]
        geometry = self.randomize(volumes.shape[1:], self._centre(volumes[source]))
        points = self._points(volumes[source], geometry)
        sample = _sample(volumes[source], [volumes[t] for t in targets], geometry, points, self.profile)
        sample.update(tokens=torch.as_tensor(np.asarray(data["tokens"])[targets]),
                      modality=torch.as_tensor(np.asarray(data["modalities"])[targets]),
                      input_modality=data["modalities"][source], prompt=[data["prompts"][t] for t in targets],
                      subject=data["subject"])
        return sample


class SRValidationVolumed(MapTransform):
    """A whole held-out (source, target) pair for validation: the source volume degraded as a clinical scan with a
    fixed ``scale`` (high-res voxels per low-res voxel per axis, box slabs of that width) into ``image [1, *n]``, and
    the target on the matching high-res grid as ``label [1, *P]`` (``P = round(n x scale)``, the volume centre-cropped
    by less than one low-res voxel so the grids tile the same field of view), with ``out_shape = P`` for the
    inferer. Deterministic, so a CacheDataset computes it once.
    """

    def __init__(self, keys=("source", "target"), scale=(1.0, 1.0, 4.0), profile: str = "box"):
        MapTransform.__init__(self, keys)
        self.scale = tuple(float(s) for s in scale)
        self.profile = _check_profile(profile)
        if len(self.scale) != 3 or min(self.scale) < 1:
            raise ValueError(f"SRValidationVolumed: expected 3 scales >= 1, got {scale}")

    def __call__(self, data) -> dict:
        source, target = (np.asarray(data[key], dtype=np.float32) for key in self.keys)
        source, target = source.reshape(source.shape[-3:]), target.reshape(target.shape[-3:])  # drop the channel
        if source.shape != target.shape:
            raise ValueError(f"SRValidationVolumed: source and target grids differ: {source.shape} vs {target.shape}")
        lr_size = tuple(max(1, int(d // s)) for d, s in zip(target.shape, self.scale))
        hr_size = tuple(min(d, p) for d, p in zip(target.shape, hr_patch_size(lr_size, self.scale)))
        start = tuple((d - p) // 2 for d, p in zip(target.shape, hr_size))
        geometry = PatchGeometry(start, hr_size, lr_size, tuple(p / n for p, n in zip(hr_size, lr_size)))
        out = {k: data[k] for k in ("tokens", "modality", "input_modality", "prompt", "subject")}
        out["image"] = torch.as_tensor(degrade(source, geometry, self.profile))[None]
        out["label"] = torch.as_tensor(crop_zero_padded(target, start, hr_size))[None]
        out["out_shape"] = torch.tensor(hr_size)
        return out
