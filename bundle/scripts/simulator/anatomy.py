"""Subject anatomy as partial-volume tissue fractions, derived from the MNI ICBM152 2009 template that nilearn ships.

The template's grey- and white-matter probability maps and brain mask (Fonov et al., NeuroImage 2011, 54:313-327)
give WM, GM and CSF (mask minus GM minus WM). Grey matter is split into cortex and deep nuclei by position, each
subject gets a smooth random deformation, a size factor (sex, infant growth) and age-related CSF widening, and may
carry a tumour or white-matter hyperintensities. Fractions stay fractions throughout (never hard labels), so partial
volume survives every step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

from .random_fields import smooth_random_field
from .tissue import TISSUES

# Kept around the brain's bounding box: room for deformation, with less disk and time than the full 197x233x189.
TEMPLATE_MARGIN_MM = 6
# Deep nuclei (caudate, putamen, pallidum, thalamus) occupy roughly this MNI box (mm); grey matter inside it that lies
# deeper than DEEP_GM_DEPTH_MM below the brain surface is called deep grey matter (cortex is within a few cm of it).
DEEP_GM_BOX_MM = ((-32.0, 32.0), (-38.0, 22.0), (-12.0, 24.0))
DEEP_GM_DEPTH_MM = 14.0


@dataclass
class Anatomy:
    """Tissue fractions (each a float32 volume in [0, 1], summing to the brain fraction) on one voxel grid."""

    fractions: dict[str, np.ndarray]
    affine: np.ndarray
    voxel_mm: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return next(iter(self.fractions.values())).shape

    def fraction(self, tissue: str) -> np.ndarray:
        if tissue not in TISSUES:
            raise ValueError(f"tissue: expected one of {TISSUES}, got {tissue!r}")
        return self.fractions[tissue] if tissue in self.fractions else np.zeros(self.shape, np.float32)

    def brain(self) -> np.ndarray:
        return np.sum(list(self.fractions.values()), axis=0)


@dataclass(frozen=True)
class Template:
    anatomy: Anatomy  # WM, cGM, dGM, CSF of the template itself
    t1: np.ndarray  # the template's own (real, averaged) T1w intensities on the same grid: the realism reference


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average over factor^3 blocks: exact partial volume at a coarser grid (the volume is padded with zeros)."""
    if factor == 1:
        return volume
    pad = [(0, (-s) % factor) for s in volume.shape]
    v = np.pad(volume, pad)
    s = v.shape
    return v.reshape(s[0] // factor, factor, s[1] // factor, factor, s[2] // factor, factor).mean(axis=(1, 3, 5))


def _crop_to_brain(volumes: list[np.ndarray], mask: np.ndarray, affine: np.ndarray, margin: int):
    """Crop (zero-padding where the brain touches the template edge) to the mask's bounding box plus ``margin``."""
    idx = np.argwhere(mask > 0)
    lo, hi = idx.min(0) - margin, idx.max(0) + margin + 1
    pad = [(max(0, -int(low)), max(0, int(high) - s)) for low, high, s in zip(lo, hi, mask.shape)]
    lo_p = lo + [p[0] for p in pad]
    hi_p = hi + [p[0] for p in pad]
    window = tuple(slice(int(a), int(b)) for a, b in zip(lo_p, hi_p))
    out_affine = affine.copy()
    out_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return [np.pad(v, pad)[window] for v in volumes], out_affine


def _soft_box(coords: list[np.ndarray], box, softness_mm: float = 3.0) -> np.ndarray:
    weight = 1.0
    for c, (low, high) in zip(coords, box):
        weight = weight * special.expit((c - low) / softness_mm) * special.expit((high - c) / softness_mm)
    return weight


@functools.lru_cache(maxsize=4)
def load_template(voxel_mm: int = 1) -> Template:
    """The MNI152 2009 tissue maps, cropped around the brain, at ``voxel_mm`` (integer; 1 = the template's own grid).

    Cached: loading takes seconds and every subject starts from it. The arrays are read-only.
    """
    if isinstance(voxel_mm, bool) or int(voxel_mm) != voxel_mm or voxel_mm < 1:
        raise ValueError(f"voxel_mm: expected a positive integer (template voxels per output voxel), got {voxel_mm!r}")
    voxel_mm = int(voxel_mm)
    if voxel_mm == 1:
        return _load_template_1mm()
    full = load_template(1)
    fractions = {k: _block_mean(v, voxel_mm).astype(np.float32) for k, v in full.anatomy.fractions.items()}
    t1 = _block_mean(full.t1, voxel_mm).astype(np.float32)
    half = (voxel_mm - 1) / 2.0  # the coarse voxel's centre is the mean of the fine centres it covers
    affine = full.anatomy.affine @ np.array([[voxel_mm, 0, 0, half], [0, voxel_mm, 0, half],
                                             [0, 0, voxel_mm, half], [0, 0, 0, 1]], dtype=float)
    return _read_only(Template(Anatomy(fractions, affine, voxel_mm), t1))


def _read_only(template: Template) -> Template:
    for v in (*template.anatomy.fractions.values(), template.t1):
        v.setflags(write=False)
    return template


def _load_template_1mm() -> Template:
    from nilearn import datasets  # deferred: importing nilearn costs about a second

    images = [datasets.load_mni152_template(resolution=1), datasets.load_mni152_gm_template(resolution=1),
              datasets.load_mni152_wm_template(resolution=1), datasets.load_mni152_brain_mask(resolution=1)]
    t1, gm, wm, mask = (np.asarray(im.get_fdata(), dtype=np.float32) for im in images)
    affine = images[0].affine.copy()
    mask = (mask > 0.5).astype(np.float32)
    gm, wm = gm * mask, wm * mask
    tissue_sum = np.maximum(gm + wm, 1.0)  # a few voxels have GM + WM slightly above 1
    gm, wm = gm / tissue_sum, wm / tissue_sum
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    (t1, gm, wm, csf, mask), affine = _crop_to_brain([t1, gm, wm, csf, mask], mask, affine, TEMPLATE_MARGIN_MM)

    depth = ndimage.distance_transform_edt(mask > 0)  # mm below the brain surface (1 mm grid)
    coords = [affine[a, a] * np.arange(n) + affine[a, 3] for a, n in enumerate(mask.shape)]
    coords = np.meshgrid(*coords, indexing="ij", sparse=True)
    deep = (_soft_box(coords, DEEP_GM_BOX_MM) * special.expit((depth - DEEP_GM_DEPTH_MM) / 2.0)).astype(np.float32)
    fractions = {"WM": wm, "cGM": gm * (1.0 - deep), "dGM": gm * deep, "CSF": csf}
    return _read_only(Template(Anatomy(fractions, affine, 1), t1))


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def brain_size_factor(age_years: float, sex: str) -> float:
    """Linear brain size relative to the adult template.

    Total brain volume roughly doubles in the first year and grows ~15% in the second (Knickmeyer et al., J Neurosci
    2008, 28:12176-12182): modelled as volume ``1 - 0.64 exp(-age / 1.21 y)``. Adult men have ~10% larger brain
    volume than women (Ruigrok et al., Neurosci Biobehav Rev 2014, 39:34-50): +-1.8% linear.
    """
    volume = 1.0 - 0.64 * np.exp(-max(age_years, 0.0) / 1.21)
    sex_factor = {"M": 1.018, "F": 0.982}.get(sex, 1.0)
    return float(volume ** (1.0 / 3.0) * sex_factor)


def _warp(template: Anatomy, rng: np.random.Generator, size_factor: float, deform: bool) -> dict[str, np.ndarray]:
    """Resample the template fractions through a random affine (rotation, anisotropic scale, shift) plus a smooth
    displacement field (SynthSeg-style spatial augmentation; Billot et al., Med Image Anal 2023, 86:102789)."""
    shape = np.array(template.shape)
    v = template.voxel_mm
    if not deform and size_factor == 1.0:
        return {k: np.array(a) for k, a in template.fractions.items()}
    angles = np.deg2rad(rng.normal(0.0, 4.0, 3)) if deform else np.zeros(3)
    scale = size_factor * (np.exp(rng.normal(0.0, 0.03, 3)) if deform else np.ones(3))
    shift = rng.normal(0.0, 2.0 / v, 3) if deform else np.zeros(3)
    to_template = _rotation(angles) @ np.diag(1.0 / scale)  # output index offset -> template index offset
    centre = (shape - 1) / 2.0
    idx = np.indices(tuple(shape), dtype=np.float32).reshape(3, -1) - centre[:, None].astype(np.float32)
    coords = (to_template.astype(np.float32) @ idx).reshape(3, *shape) + (centre - shift)[:, None, None, None]
    if deform:
        for axis in range(3):  # ~2 mm s.d. displacements correlated over ~30 mm
            coords[axis] += smooth_random_field(tuple(shape), rng, 30.0 / v) * (2.0 / v)
    return {k: ndimage.map_coordinates(a, coords, order=1, output=np.float32) for k, a in template.fractions.items()}


def _widen_csf(fractions: dict[str, np.ndarray], widening_vox: float) -> None:
    """Grow CSF into neighbouring tissue by ``widening_vox`` voxels (grey dilation of the CSF fraction), taking the
    volume from WM and GM in proportion: ventricles and sulci widen with age, partial volume is preserved."""
    if widening_vox <= 0:
        return
    csf = fractions["CSF"]
    brain = sum(fractions.values())
    grown = csf
    whole, part = int(widening_vox), widening_vox - int(widening_vox)
    for _ in range(whole):
        grown = ndimage.grey_dilation(grown, size=(3, 3, 3))
    if part > 0:
        grown = grown + part * (ndimage.grey_dilation(grown, size=(3, 3, 3)) - grown)
    grown = np.minimum(np.maximum(grown, csf), brain)
    tissue = brain - csf
    keep = np.divide(brain - grown, tissue, out=np.ones_like(tissue), where=tissue > 1e-6)
    for name in fractions:
        if name != "CSF":
            fractions[name] = (fractions[name] * keep).astype(np.float32)
    fractions["CSF"] = grown.astype(np.float32)


def csf_widening_mm(age_years: float) -> float:
    """Ventricular and sulcal widening: none before ~40, growing to ~2 mm per boundary at 90 (ventricular volume
    roughly triples between 40 and 90; Fjell et al., Cereb Cortex 2009, 19:2001-2012)."""
    return float(np.clip((age_years - 40.0) / 50.0, 0.0, 1.0) * 2.0)


def _add_vessels(fractions: dict[str, np.ndarray], rng: np.random.Generator, voxel_mm: int) -> None:
    """Tubular vessels in the CSF spaces (sulci, cisterns; choroid plexus in the ventricles): the intersection of
    the zero sets of two smooth random fields is a network of curves; a Gaussian of the distance gives ~1-2 mm tubes."""
    shape = fractions["CSF"].shape
    a, b = (smooth_random_field(shape, rng, 6.0 / voxel_mm) for _ in range(2))
    tubes = np.exp(-(a * a + b * b) / (2 * 0.12 ** 2)).astype(np.float32)
    vessel = 0.8 * tubes * fractions["CSF"]
    fractions["CSF"] = fractions["CSF"] - vessel
    fractions["vessel"] = vessel


def _sigmoid(x):
    return special.expit(x).astype(np.float32)


def _random_wm_point(wm: np.ndarray, rng: np.random.Generator, threshold: float = 0.9) -> np.ndarray:
    candidates = np.argwhere(wm > threshold)
    return candidates[rng.integers(len(candidates))].astype(float)


def _add_tumour(fractions: dict[str, np.ndarray], rng: np.random.Generator, voxel_mm: int) -> None:
    """A glioma-like lesion: necrotic core, gadolinium-enhancing rim and surrounding (mostly white-matter) oedema,
    with an irregular outline; it replaces the normal tissue it occupies."""
    shape = fractions["WM"].shape
    centre = _random_wm_point(fractions["WM"], rng)
    radii = rng.uniform(10.0, 22.0) * np.exp(rng.normal(0.0, 0.15, 3)) / voxel_mm
    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
    centre, radii = centre.astype(np.float32), radii.astype(np.float32)
    r = np.sqrt(sum(((g - c) / rr) ** 2 for g, c, rr in zip(grids, centre, radii)))
    r = r * (1.0 + 0.15 * smooth_random_field(shape, rng, 10.0 / voxel_mm))
    edge = 0.05
    mass = _sigmoid((0.75 - r) / edge)
    necrotic = mass * _sigmoid((0.45 - r) / edge) if rng.random() < 0.8 else np.zeros_like(mass)
    oedema_weight = np.clip(_sigmoid((rng.uniform(1.4, 2.0) - r) / (2 * edge)) - mass, 0.0, 1.0)
    brain = sum(fractions.values())
    for name in list(fractions):
        fractions[name] = fractions[name] * (1.0 - mass)
    fractions["necrosis"] = (necrotic * brain).astype(np.float32)
    fractions["enhancing"] = ((mass - necrotic) * brain).astype(np.float32)
    oedema = oedema_weight * fractions["WM"]  # vasogenic oedema spreads along white matter
    fractions["WM"] = (fractions["WM"] - oedema).astype(np.float32)
    fractions["oedema"] = oedema.astype(np.float32)


def _add_wmh(fractions: dict[str, np.ndarray], rng: np.random.Generator, voxel_mm: int, age_years: float) -> None:
    """White-matter hyperintensities: a few irregular blobs (2-8 mm) in white matter, more of them with age."""
    shape = fractions["WM"].shape
    count = int(rng.integers(3, 8) + max(0.0, age_years - 50.0) / 5.0)
    seeds = np.zeros(shape, np.float32)
    for _ in range(count):
        i, j, k = _random_wm_point(fractions["WM"], rng).astype(int)
        seeds[i, j, k] = rng.uniform(0.5, 1.5) * 300.0
    blobs = ndimage.gaussian_filter(seeds, rng.uniform(2.0, 3.0) / voxel_mm)
    blobs *= np.exp(0.3 * smooth_random_field(shape, rng, 4.0 / voxel_mm))
    lesion = _sigmoid((blobs - 1.0) / 0.15) * fractions["WM"]
    fractions["WM"] = (fractions["WM"] - lesion).astype(np.float32)
    fractions["WMH"] = lesion.astype(np.float32)


def subject_anatomy(rng: np.random.Generator, age_years: float, sex: str, tumour: bool = False, wmh: bool = False,
                    voxel_mm: int = 1, deform: bool = True, vessels: bool = True) -> Anatomy:
    """One subject's tissue fractions on the (cropped) template grid at ``voxel_mm``."""
    template = load_template(voxel_mm).anatomy
    fractions = _warp(template, rng, brain_size_factor(age_years, sex), deform)
    _widen_csf(fractions, csf_widening_mm(age_years) * float(np.exp(rng.normal(0.0, 0.3))) / voxel_mm)
    if vessels:
        _add_vessels(fractions, rng, voxel_mm)
    if tumour:
        _add_tumour(fractions, rng, voxel_mm)
    if wmh:
        _add_wmh(fractions, rng, voxel_mm, age_years)
    return Anatomy(fractions, template.affine.copy(), voxel_mm)
