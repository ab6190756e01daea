"""``simulate``: the whole pipeline, subject by subject, into a BIDS dataset."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..errors import UserInputError, check_bundle_run, config_flag
from . import bids
from .acquisition import (
    Geometry,
    acquire_geometry,
    add_rician_noise,
    bias_field,
    noise_sigma,
    skull_strip_mask,
    to_scanner_scale,
)
from .anatomy import Anatomy, subject_anatomy
from .presets import MODALITIES, PRESETS, SitePreset, Subject, get_preset, sample_subject, site_protocol
from .realism import MT_MODALITIES, RealismRanges, calibrate, magnetisation_transfer, vary_tissue
from .render import render
from .sequences import Sequence
from .tissue import TissueProperties, tissue_properties, with_gadolinium


@dataclass(frozen=True)
class SimulatedImage:
    """What one written image was simulated with (the source of its sidecar and of its prompt)."""

    path: str
    modality: str
    subject: Subject
    sequence: Sequence
    voxel_size: tuple[float, float, float]
    snr: float
    acq: str | None = None


@dataclass
class _SubjectScan:
    """Everything the images of one subject share: anatomy, tissue properties, coil bias, skull strip."""

    subject: Subject
    anatomy: Anatomy
    properties: dict[str, TissueProperties]
    bias: np.ndarray
    strip: np.ndarray

    def clean_image(self, modality: str, sequence: Sequence, rng: np.random.Generator,
                    realism: np.random.Generator | None = None) -> np.ndarray:
        properties = self.properties
        if realism is not None and modality in MT_MODALITIES:
            properties = magnetisation_transfer(properties, realism.uniform(*RealismRanges().mt_saturation))
        if modality == "T1CE":
            properties = with_gadolinium(properties, self.subject.field_strength)
        # Each series sees the same coil profile a little differently (coil loading, prescan normalisation).
        bias = self.bias ** np.float32(rng.uniform(0.7, 1.3))
        return render(self.anatomy, properties, sequence, self.subject.field_strength) * bias * self.strip


def _write_image(root: str, scan: _SubjectScan, modality: str, sequence: Sequence, snr: float,
                 rng: np.random.Generator, geometry: Geometry | None = None, acq: str | None = None,
                 realism: np.random.Generator | None = None) -> SimulatedImage:
    anatomy = scan.anatomy
    clean = scan.clean_image(modality, sequence, rng, realism if geometry is None else None)
    wm, mask, affine = anatomy.fraction("WM"), (scan.strip > 0).astype(np.float32), anatomy.affine
    if geometry is not None:
        clean, _ = acquire_geometry(clean, anatomy.affine, anatomy.voxel_mm, geometry)
        wm, _ = acquire_geometry(wm, anatomy.affine, anatomy.voxel_mm, geometry)
        mask, affine = acquire_geometry(mask, anatomy.affine, anatomy.voxel_mm, geometry)
    noisy = add_rician_noise(clean, noise_sigma(clean, wm, snr), rng) * (mask > 0.5)
    if realism is not None and geometry is None:  # real-scan artefacts (realism.py), on the truth-grid images
        noisy = calibrate(noisy, mask > 0.5, realism, voxel_mm=anatomy.voxel_mm)
    participant = scan.subject.participant_id
    stem = bids.image_stem(participant, modality, acq)
    folder = os.path.join(root, f"sub-{participant}", "anat")
    voxel_size = (float(anatomy.voxel_mm),) * 3 if geometry is None else geometry.voxel_size()
    stored = to_scanner_scale(noisy, rng, signed=realism is not None and geometry is None)
    bids.save_nifti(os.path.join(folder, stem + ".nii.gz"), stored, affine)
    bids.save_json(os.path.join(folder, stem + ".json"),
                   bids.sidecar(scan.subject, modality, sequence, geometry, anatomy.voxel_mm, snr))
    return SimulatedImage(os.path.join(folder, stem + ".nii.gz"), modality, scan.subject, sequence, voxel_size, snr,
                          acq)


def _write_truth(root: str, scan: _SubjectScan) -> None:
    """Tissue fractions and the brain mask on the truth grid, as BIDS derivatives (uint8 with a scale factor)."""
    anatomy, participant = scan.anatomy, scan.subject.participant_id
    folder = os.path.join(root, "derivatives", bids.DERIVATIVE_NAME, f"sub-{participant}", "anat")
    labels = {"GM": anatomy.fraction("cGM") + anatomy.fraction("dGM"), "WM": anatomy.fraction("WM"),
              "CSF": anatomy.fraction("CSF"), "deepGM": anatomy.fraction("dGM"), "vessel": anatomy.fraction("vessel")}
    for lesion in ("WMH", "oedema", "enhancing", "necrosis"):
        if lesion in anatomy.fractions:
            labels[lesion] = anatomy.fraction(lesion)
    for label, fraction in labels.items():
        # uint8 with a scale factor nibabel picks (max / 255): fractions to ~0.004, a quarter of float32's disk.
        bids.save_nifti(os.path.join(folder, f"sub-{participant}_label-{label}_probseg.nii.gz"),
                        np.clip(fraction, 0.0, 1.0), anatomy.affine, dtype=np.uint8)
    bids.save_nifti(os.path.join(folder, f"sub-{participant}_desc-brain_mask.nii.gz"),
                    (scan.strip > 0).astype(np.uint8), anatomy.affine)


def simulate_subject(root: str, preset: SitePreset, subject: Subject, rng: np.random.Generator,
                     voxel_mm: int = 1, realism: np.random.Generator | None = None) -> list[SimulatedImage]:
    """All seven contrasts on the truth grid, the site's clinical acquisitions, and the truth derivatives.

    ``realism``: a generator of its own for the per-subject tissue and skull-strip variation and the real-scan
    artefacts of ``realism.py`` (None: a clean simulation); ``rng`` makes the same draws either way, so the anatomy
    and protocols stay those of the clean subject."""
    anatomy = subject_anatomy(rng, subject.age, subject.sex, subject.tumour, subject.wmh, voxel_mm)
    properties = tissue_properties(subject.field_strength, subject.age, rng)
    bias = bias_field(anatomy.shape, rng, voxel_mm, rng.uniform(*preset.bias_strength))
    strip_shift_mm = 0.0
    if realism is not None:
        properties = vary_tissue(properties, realism)
        strip_shift_mm = realism.uniform(*RealismRanges().strip_shift_mm)
    scan = _SubjectScan(subject, anatomy, properties, bias,
                        skull_strip_mask(anatomy.brain(), rng, voxel_mm, strip_shift_mm))
    images = []
    for modality in MODALITIES:
        sequence, snr = site_protocol(preset, subject, modality).sample(rng)
        images.append(_write_image(root, scan, modality, sequence, snr, rng, realism=realism))
    for clinical in preset.clinical:
        protocol = clinical.protocol or site_protocol(preset, subject, clinical.modality)
        sequence, snr = protocol.sample(rng)
        images.append(_write_image(root, scan, clinical.modality, sequence, snr, rng, clinical.geometry,
                                   clinical.label))
    _write_truth(root, scan)
    return images


def realism_subjects(num_subjects: int, realism: bool | float) -> list[bool]:
    """Which subjects get the realism of ``realism.py``: all (True, 1.0), none (False, 0.0), or a share spread evenly
    over the subject indices (0.5: every second subject), so each site preset gets both kinds in a large dataset."""
    try:
        share = float(realism)  # a bool, a number, or a number's text from the command line
    except (TypeError, ValueError):
        share = float(config_flag(realism, "realism"))  # "true" / "false" in any case, else one error line
    if not 0.0 <= share <= 1.0:
        raise UserInputError(f"realism: expected true, false or a share in [0, 1], got {realism!r}")
    return [int((index + 1) * share) > int(index * share) for index in range(int(num_subjects))]


def _simulate_index(root: str, preset: SitePreset, seed: int, index: int, voxel_mm: int, realism: bool
                    ) -> tuple[Subject, list[SimulatedImage]]:
    """Subject ``index`` of a dataset: its own generators, so it does not depend on the others (or their order)."""
    rng = np.random.default_rng([int(seed), index])
    subject = sample_subject(preset, f"{index + 1:03d}", rng)
    artefacts = np.random.default_rng([int(seed), index, 1]) if realism else None
    return subject, simulate_subject(root, preset, subject, rng, voxel_mm, artefacts)


def simulate(output_dir: str, num_subjects: int = 20, seed: int = 0, sites: list[str] | str | None = None,
             voxel_mm: int = 1, progress: bool = True, realism: bool | float = False, workers: int = 1
             ) -> list[SimulatedImage]:
    """Simulate ``num_subjects`` subjects into a BIDS dataset at ``output_dir``; returns every image written.

    Subject ``i`` uses site ``sites[i % len(sites)]`` (default: every preset in turn) and its own random generator
    seeded by ``(seed, i)``, so a dataset is reproducible and a subject does not depend on how many others are made.
    ``voxel_mm`` (integer) coarsens the truth grid, for tests and quick looks. ``realism`` varies each subject's tissue
    parameters and skull-strip depth and adds the real-scan effects of ``realism.py`` (magnetisation transfer, bright
    tail, thick-slice blur, 8-bit storage) to the truth-grid images, from a generator seeded ``(seed, i, 1)``: off
    by default, so existing datasets (the seed-1000 evaluation subjects) are unchanged; a number in [0, 1] applies it
    to that share of the subjects (``realism_subjects``). ``workers`` > 1 simulates that many subjects at once in
    separate processes (the same dataset).
    """
    check_bundle_run()  # configs/simulate.yaml runs nothing of the bundle before this
    _check_arguments(output_dir, num_subjects, seed, voxel_mm)
    with_realism = realism_subjects(num_subjects, realism)
    presets = [get_preset(name) for name in _site_names(sites)]
    root = os.path.abspath(str(output_dir))
    os.makedirs(root, exist_ok=True)
    jobs = [(root, presets[i % len(presets)], int(seed), i, voxel_mm, with_realism[i]) for i in range(num_subjects)]
    bar = {"desc": "simulating subjects", "unit": "subject", "disable": not progress, "total": len(jobs)}
    if int(workers) > 1:
        with ProcessPoolExecutor(int(workers)) as pool:
            results = list(tqdm(pool.map(_simulate_index, *zip(*jobs)), **bar))
    else:
        results = [_simulate_index(*job) for job in tqdm(jobs, **bar)]
    bids.write_participants(root, [subject for subject, _ in results])
    bids.write_descriptions(root, int(seed))
    return [image for _, images in results for image in images]


def _check_arguments(output_dir, num_subjects, seed, voxel_mm) -> None:
    """Checked before anything is written: one ``UserInputError`` line naming the bad argument."""
    def whole(value: object) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not output_dir:
        raise UserInputError("output_dir: expected a folder to write the dataset to, got an empty path")
    if os.path.exists(str(output_dir)) and not os.path.isdir(str(output_dir)):
        raise UserInputError(f"output_dir {output_dir}: a file, not a folder")
    if not whole(num_subjects) or num_subjects <= 0:
        raise UserInputError(f"num_subjects: expected a positive integer, got {num_subjects!r}")
    if not whole(seed) or seed < 0:
        raise UserInputError(f"seed: expected a non-negative integer, got {seed!r}")
    if not (whole(voxel_mm) or isinstance(voxel_mm, float) and voxel_mm.is_integer()) or voxel_mm < 1:
        raise UserInputError(f"voxel_mm: expected a positive integer (mm of the truth grid), got {voxel_mm!r}")


def _site_names(sites: list[str] | str | None) -> list[str]:
    """The site presets to cycle through (default: all), every name checked."""
    names = list(PRESETS) if sites is None else [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise UserInputError("sites: expected at least one site preset name, got an empty list")
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        raise UserInputError(f"sites: unknown site preset(s) {unknown}; expected some of {sorted(PRESETS)}")
    return names
