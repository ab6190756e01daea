"""Out-of-distribution warnings at inference: is this input like what the model was trained on?

A warning, never a refusal: each finding is one ``logging`` warning line and one entry of the output sidecar's
``ood_warnings``. The trained ranges are derived from the simulator's training site presets (``TRAINING_SITES``,
as in ``configs/simulate.yaml``) and geometries, so they follow the presets when those change.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ..data.intensity import normalize_intensity, white_matter_peak
from ..prompt import Prompt
from ..simulator.presets import PRESETS
from .volume_io import Volume

logger = logging.getLogger(__name__)

TRAINING_SITES = ("OASIS", "HCP-YA", "HCP-D", "HCP-A", "IXI", "BCP", "AIBL", "BraTS2021", "clinical")
# Truth grids are simulated at 1 or 2 mm (configs/simulate.yaml voxel_mm) and stage 2 degrades patches to thick slices.
TRUTH_VOXEL_MM = (1.0, 2.0)
# A brain is 1.1-1.7 L (adults; Allen et al., Am J Phys Anthropol 2002, 118:341-358); a head with scalp and skull is
# about 3-5 L: a non-zero region above 2.5 L is not a brain-extracted image.
MAX_BRAIN_ML = 2500.0
# Skull-stripped images keep a zero background; below this fraction of zero voxels the background was kept.
MIN_BACKGROUND_FRACTION = 0.15
# Field of view of the non-zero region along any axis: a brain spans 130-180 mm (ibid.).
FOV_MM = (60.0, 300.0)
# Histogram of the normalised brain: the bright-half peak over the 99th percentile. Measured by bench/sim_vs_real.py
# (docs/sim_vs_real.md): 0.35-0.93 over the simulated training images (T2w lowest: bright CSF fills the top), 0.29-0.60
# on the real case; below 0.25 no image, simulated or real, had that shape.
PEAK_OVER_P99 = (0.25, 1.0)
# Fraction of brain voxels darker than 5 % of the 99th percentile; simulated brains stay below 10 %.
MAX_DARK_FRACTION = 0.25


def trained_voxel_range() -> tuple[float, float]:
    """The smallest in-plane and the largest slice spacing (mm) of any training acquisition."""
    geometries = [c.geometry for name in TRAINING_SITES for c in PRESETS[name].clinical]
    smallest = min([TRUTH_VOXEL_MM[0]] + [g.in_plane_mm for g in geometries])
    largest = max([TRUTH_VOXEL_MM[1]] + [max(g.thickness_mm, g.thickness_mm + g.gap_mm) for g in geometries])
    return smallest, largest


def trained_parameter_ranges(modality: str) -> dict[str, tuple[float, float]]:
    """TR/TE/TI/FA (ms, degrees) ranges over the training sites' protocols for ``modality`` (both field strengths)."""
    from ..simulator.presets import _BASE_15T  # noqa: PLC0415 - 1.5 T timings replace a 3 T site's defaults

    protocols = [PRESETS[name].protocols[modality] for name in TRAINING_SITES] + [_BASE_15T[modality]]
    ranges = {}
    for field in ("tr", "te", "ti", "fa"):
        bounds = [getattr(p, field) for p in protocols if getattr(p, field) is not None]
        if bounds:
            ranges[field] = (min(b[0] for b in bounds), max(b[1] for b in bounds))
    return ranges


def trained_ages() -> tuple[float, float]:
    return (min(PRESETS[n].age_range[0] for n in TRAINING_SITES), max(PRESETS[n].age_range[1] for n in TRAINING_SITES))


def trained_field_strengths() -> set[float]:
    return {f for name in TRAINING_SITES for f in PRESETS[name].field_strengths}


def _geometry_warnings(volume: Volume) -> list[str]:
    smallest, largest = trained_voxel_range()
    spacing = volume.spacing
    found = []
    if min(spacing) < 0.5 * smallest:
        found.append(f"voxel size {min(spacing):.2f} mm is below the trained range (>= {0.5 * smallest:.2f} mm)")
    if max(spacing) > largest:
        found.append(f"slice thickness {max(spacing):.2f} mm is beyond the trained range (<= {largest:.2f} mm)")
    return found


def _extent_warnings(volume: Volume) -> list[str]:
    array = volume.array
    nonzero = array != 0
    found = []
    voxel_ml = float(abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
    background = 1.0 - float(nonzero.mean())
    volume_ml = float(nonzero.sum()) * voxel_ml
    if background < MIN_BACKGROUND_FRACTION or volume_ml > MAX_BRAIN_ML:
        found.append(f"looks like a whole head, not a brain-extracted image ({volume_ml:.0f} mL non-zero, "
                     f"{100 * background:.0f}% zero background; trained on skull-stripped brains)")
    if nonzero.any():
        occupied = [np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        extent = np.array([o[-1] - o[0] + 1 for o in occupied]) * np.asarray(volume.spacing)
        if extent.min() < FOV_MM[0]:
            found.append(f"field of view {extent.min():.0f} mm along one axis is smaller than a brain "
                         f"(>= {FOV_MM[0]:.0f} mm trained)")
        if extent.max() > FOV_MM[1]:
            found.append(f"field of view {extent.max():.0f} mm along one axis is larger than a head "
                         f"(<= {FOV_MM[1]:.0f} mm trained)")
    return found


def _histogram_warnings(volume: Volume) -> list[str]:
    try:
        normalised = normalize_intensity(volume.array)
    except ValueError:
        return ["the image has no positive brain intensities"]
    values = normalised[normalised > 0]
    if values.size < 100:
        return []
    peak = white_matter_peak(values) / float(np.percentile(values, 99))
    dark = float(np.mean(values < 0.05))
    if not PEAK_OVER_P99[0] <= peak <= PEAK_OVER_P99[1] or dark > MAX_DARK_FRACTION:
        return [f"intensity histogram unlike any training image (bright-half peak / 99th percentile {peak:.2f}, "
                f"trained {PEAK_OVER_P99[0]}-{PEAK_OVER_P99[1]}; {100 * dark:.0f}% near-zero brain voxels, trained "
                f"<= {100 * MAX_DARK_FRACTION:.0f}%)"]
    return []


def _prompt_warnings(prompt: Prompt) -> list[str]:
    found = []
    for field, (low, high) in trained_parameter_ranges(prompt.modality).items():
        value = getattr(prompt, field)
        if isinstance(value, float) and not low <= value <= high:
            found.append(f"prompt {field.upper()} {value:g} is outside the trained {prompt.modality} range "
                         f"{low:g}-{high:g}")
    low, high = trained_ages()
    if prompt.age is not None and not low <= prompt.age <= high:
        found.append(f"prompt age {prompt.age:g} is outside the trained range {low:g}-{high:g} years")
    if prompt.field_strength is not None and prompt.field_strength not in trained_field_strengths():
        found.append(f"prompt field strength {prompt.field_strength:g} T was never trained "
                     f"(trained: {sorted(trained_field_strengths())} T)")
    if prompt.voxel_size is not None:
        smallest, largest = trained_voxel_range()
        if min(prompt.voxel_size) < 0.5 * smallest or max(prompt.voxel_size) > largest:
            found.append(f"prompt voxel size {prompt.voxel_size} mm is outside the trained range "
                         f"{0.5 * smallest:g}-{largest:g} mm")
    return found


def _task_warnings(source_modality: str | None, prompt: Prompt) -> list[str]:
    if source_modality is None:
        return []
    # The shipped weights restore a scan in its own contrast worse than trilinear interpolation does (measured on
    # simulated and real thick-slice scans), so such a request is flagged.
    if source_modality == prompt.modality:
        return [f"target {prompt.modality} is the input's own contrast: the shipped weights restore a scan in its own "
                f"contrast below trilinear interpolation of the input, on simulated and real thick-slice scans "
                f"(bundle/docs/README.md)"]
    # Where gadolinium enhances is not in a pre-contrast image, and the simulator's random vessels and rim lesions
    # taught no real pattern: on real patients the synthesized T1CE's departure from the input did not follow the
    # real enhancement (docs/real_data.md, "Why T1w -> T1CE stays below the input").
    if prompt.modality == "T1CE":
        return [f"target T1CE from a pre-contrast {source_modality}: this patient's enhancement (a tumour's included) "
                f"cannot be read from the input, and the output's is not the patient's; the synthesized T1CE "
                f"correlated less with the real one than the input did on 2 of 3 real patients at 4 and 2 mm, on all "
                f"3 at 1 mm (docs/real_data.md)"]
    return []


def ood_warnings(volume: Volume, prompt: Prompt | None = None, source_modality: str | None = None) -> list[str]:
    """Every way ``volume`` (and the target ``prompt``, given the input's contrast ``source_modality`` when its
    metadata tell it) lies outside the training distribution; each is logged as one warning line naming the file."""
    found = _geometry_warnings(volume) + _extent_warnings(volume) + _histogram_warnings(volume)
    if prompt is not None:
        found += _prompt_warnings(prompt) + _task_warnings(source_modality, prompt)
    for message in found:
        logger.warning("%s: out of distribution: %s", volume.path, message)
    return found


def describe_ranges(modalities: Sequence[str] = ("T1w", "T2w", "FLAIR")) -> str:
    """A short human-readable summary of the trained ranges (for the model card)."""
    smallest, largest = trained_voxel_range()
    parts = [f"voxel {0.5 * smallest:g}-{largest:g} mm", "age {:g}-{:g} y".format(*trained_ages())]
    for modality in modalities:
        ranges = trained_parameter_ranges(modality)
        parts.append(modality + " " + ", ".join(f"{k.upper()} {a:g}-{b:g}" for k, (a, b) in ranges.items()))
    return "; ".join(parts)
