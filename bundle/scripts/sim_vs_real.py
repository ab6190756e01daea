"""Simulated vs real images: the image statistics that decide whether a model trained on simulations transfers.

Every statistic is computed the same way on both sides, from the images alone (no simulator ground truth):
a 3-class Gaussian mixture on the T1w intensities inside the brain (darkest to brightest: CSF, GM, WM) segments each
subject, and each contrast of the subject is then measured on that segmentation:

- ``WM/GM``, ``CSF/GM``: ratio of the class medians of that contrast;
- ``lesion/WM``: median of FLAIR-hyperintense voxels (FLAIR above 1.3 x its GM median, outside CSF, at least 200
  voxels; empty otherwise) over the WM median, in that contrast;
- ``peak/p99``: the histogram mode of the brighter half of the brain over the brain's 99th percentile (the
  white-matter peak on T1w; sim-to-real.md: 0.66-0.84 real vs 0.98 clean simulation);
- ``noise``: robust standard deviation of neighbouring-voxel differences inside WM, over the WM median;
- ``rim``: median of the outer 2 mm of the brain mask over the brain median (dark on real skull-stripped scans);
- ``z/xy grad``: mean absolute intensity difference between neighbours along the slice axis (z) over that in-plane,
  inside the brain eroded by 3 mm (below 1 for thick 2D slices resampled to 1 mm).

    python -m scripts.sim_vs_real --real ../../shared/data/real/bids --simulated data/simulated \
        --output docs/sim_vs_real.md --limit 9      # from bundle/
"""

from __future__ import annotations

import argparse
import csv
import os
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from .errors import UserInputError
from .intensity import white_matter_peak
from .prompt import bids_modality
from .simulator.realism import calibrate
from .volume_io import atomic_path

CONTRASTS = ("T1w", "T2w", "FLAIR", "T1CE")
STATISTICS = ("WM/GM", "CSF/GM", "lesion/WM", "peak/p99", "noise", "rim", "z/xy grad")
LESION_FACTOR = 1.3
MIN_LESION_VOXELS = 200


def gmm_tissue_classes(t1w: np.ndarray, mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """Labels 0/1/2 (CSF/GM/WM: T1w darkest to brightest) inside ``mask`` from a 3-component Gaussian mixture on
    intensities clipped at the 99th percentile; -1 outside. Fitted on at most 200,000 voxels (about a second for a
    1 mm brain)."""
    from sklearn.mixture import GaussianMixture

    # Clipped at the 99th percentile: vessels, fat and enhancement would otherwise claim a class of their own.
    values = np.minimum(t1w[mask].astype(np.float64), np.percentile(t1w[mask], 99))
    rng = np.random.default_rng(seed)
    sample = values if values.size <= 200_000 else rng.choice(values, 200_000, replace=False)
    mixture = GaussianMixture(3, random_state=seed, means_init=np.quantile(sample, [0.1, 0.45, 0.85])[:, None])
    mixture.fit(sample[:, None])
    rank = np.argsort(np.argsort(mixture.means_[:, 0]))
    labels = np.full(t1w.shape, -1, np.int8)
    labels[mask] = rank[mixture.predict(values[:, None])]
    return labels


def contrast_statistics(image: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                        lesion: np.ndarray) -> dict[str, float]:
    """The statistics of one image given its subject's segmentation ``labels`` and lesion mask."""
    image = image.astype(np.float32)
    medians = [float(np.median(image[labels == k])) for k in range(3)]
    csf, gm, wm = medians
    brain = image[mask]
    p99 = float(np.percentile(brain, 99))
    white = labels == 2
    differences = np.diff(image, axis=0)[white[1:] & white[:-1]]
    noise = 1.4826 * float(np.median(np.abs(differences - np.median(differences)))) / np.sqrt(2.0)
    rim = mask & (ndimage.distance_transform_edt(mask) <= 2.0)
    inner = ndimage.binary_erosion(mask, iterations=3)
    gradient = []
    for axis in range(3):  # neighbour differences along ``axis`` whose far voxel lies in the eroded brain
        far = tuple(slice(1, None) if i == axis else slice(None) for i in range(3))
        gradient.append(float(np.mean(np.abs(np.diff(image, axis=axis))[inner[far]])))
    return {
        "WM/GM": wm / gm, "CSF/GM": csf / gm,
        "lesion/WM": float(np.median(image[lesion])) / wm if lesion.sum() >= MIN_LESION_VOXELS else float("nan"),
        "peak/p99": white_matter_peak(brain) / p99, "noise": noise / wm,
        "rim": float(np.median(image[rim])) / float(np.median(brain)),
        "z/xy grad": gradient[2] / (0.5 * (gradient[0] + gradient[1])),
    }


def _images(subject_dir: str) -> dict[str, str]:
    """Modality -> path of the subject's native (no ``acq-``) images of ``CONTRASTS``."""
    found = {}
    for name in sorted(os.listdir(subject_dir)):
        if name.endswith((".nii", ".nii.gz")) and "_acq-" not in name and bids_modality(name) in CONTRASTS:
            found[bids_modality(name)] = os.path.join(subject_dir, name)
    return found


def subject_statistics(subject_dir: str, calibration: np.random.Generator | None = None) -> dict[str, dict[str, float]]:
    """Modality -> statistics for one subject's ``anat`` folder (it needs a T1w); with a ``calibration`` generator,
    of its images after one random draw of the real-scan artefacts (``simulator.realism.calibrate``)."""
    paths = _images(subject_dir)
    if "T1w" not in paths:
        raise UserInputError(f"{subject_dir}: no T1w image to segment (expected *_T1w.nii[.gz])")
    images = {m: nib.load(p).get_fdata(dtype=np.float32) for m, p in paths.items()}
    mask = images["T1w"] > 0
    for image in images.values():
        mask &= image > 0  # every contrast's brain: the co-registered images' common support
    if calibration is not None:
        images = {m: calibrate(image, mask, calibration) for m, image in images.items()}
    labels = gmm_tissue_classes(images["T1w"], mask)
    lesion = np.zeros_like(mask)
    if "FLAIR" in images:
        flair = images["FLAIR"]
        lesion = mask & (labels != 0) & (flair > LESION_FACTOR * np.median(flair[labels == 1]))
    return {m: contrast_statistics(image, labels, mask, lesion) for m, image in images.items()}


def dataset_statistics(dataset_dir: str, label: str | None = None, limit: int | None = None,
                       calibrate_seed: int | None = None) -> list[dict[str, Any]]:
    """One row per (subject, contrast): ``source`` (``label``, else the subject's site) and the statistics, for the
    first ``limit`` subjects; ``calibrate_seed`` measures calibrated images (source suffixed ``+realism``)."""
    with open(os.path.join(dataset_dir, "participants.tsv"), newline="") as handle:
        participants = list(csv.DictReader(handle, delimiter="\t"))[:limit]
    calibration = None if calibrate_seed is None else np.random.default_rng(calibrate_seed)
    rows = []
    for participant in participants:
        subject = participant["participant_id"]
        source = label or participant.get("site") or os.path.basename(os.path.normpath(dataset_dir))
        source += "" if calibration is None else " +realism"
        for modality, stats in subject_statistics(os.path.join(dataset_dir, subject, "anat"), calibration).items():
            rows.append({"source": source, "subject": subject, "contrast": modality, **stats})
    return rows


def _range(rows: list[dict[str, Any]], contrast: str, statistic: str) -> tuple[float, float] | None:
    values = [r[statistic] for r in rows if r["contrast"] == contrast and np.isfinite(r[statistic])]
    return (min(values), max(values)) if values else None


def coverage_table(real: list[dict[str, Any]], *simulated: tuple[str, list[dict[str, Any]]]) -> str:
    """Markdown: per contrast and statistic, the real value(s) and each simulated set's range over its subjects."""
    names = [name for name, _ in simulated]
    lines = ["| contrast | statistic | real | " + " | ".join(f"{n} min-max | real inside?" for n in names) + " |",
             "|---|---|---|" + "---|---|" * len(names)]
    for contrast in CONTRASTS:
        for statistic in STATISTICS:
            real_values = [r[statistic] for r in real if r["contrast"] == contrast and np.isfinite(r[statistic])]
            if not real_values:
                continue
            cells = []
            for _, rows in simulated:
                bounds = _range(rows, contrast, statistic)
                inside = bounds is not None and all(bounds[0] <= v <= bounds[1] for v in real_values)
                cells += ["-", "-"] if bounds is None else [f"{bounds[0]:.3f}-{bounds[1]:.3f}",
                                                            "yes" if inside else "**no**"]
            lines.append(f"| {contrast} | {statistic} | {', '.join(f'{v:.3f}' for v in real_values)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_site_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: mean of each statistic per (source, contrast)."""
    lines = ["| source | contrast | " + " | ".join(STATISTICS) + " |", "|---|---|" + "---|" * len(STATISTICS)]
    keys = list(dict.fromkeys((r["source"], r["contrast"]) for r in rows))
    for source, contrast in sorted(keys, key=lambda k: (CONTRASTS.index(k[1]), k[0])):
        members = [r for r in rows if r["source"] == source and r["contrast"] == contrast]
        means = [np.nanmean([m[s] for m in members]) if any(np.isfinite(m[s]) for m in members) else np.nan
                 for s in STATISTICS]
        cells = ["-" if np.isnan(v) else f"{v:.3f}" for v in means]
        lines.append(f"| {source} | {contrast} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real", required=True, help="BIDS dataset of co-registered real scans")
    parser.add_argument("--simulated", required=True, help="simulated BIDS dataset")
    parser.add_argument("--output", required=True, help="Markdown file to write")
    parser.add_argument("--limit", type=int, default=None, help="first N simulated subjects only")
    parser.add_argument("--calibrate_seed", type=int, default=0, help="seed of the realism draws")
    args = parser.parse_args(argv)
    real = dataset_statistics(args.real, label="real")
    clean = dataset_statistics(args.simulated, limit=args.limit)
    calibrated = dataset_statistics(args.simulated, limit=args.limit, calibrate_seed=args.calibrate_seed)
    command = (f"python -m scripts.sim_vs_real --real {args.real} --simulated {args.simulated} --output {args.output}"
               + (f" --limit {args.limit}" if args.limit else "") + f" --calibrate_seed {args.calibrate_seed}")
    text = ("# Simulated vs real image statistics\n\n" + __doc__.split("\n\n", 1)[1].split("    python")[0]
            + f"\nMade by `{command}` (run from `bundle/`). `+realism`: the same simulated images after one random "
            "draw of `scripts/simulator/realism.py` (bright tail, thick-slice resampling, 8-bit storage, arbitrary "
            "scale) per image.\n\n## Coverage: is each real value inside the simulated range?\n\n"
            + coverage_table(real, ("simulated", clean), ("simulated +realism", calibrated))
            + "\n\n## Per source (mean over subjects)\n\n" + per_site_table(real + clean + calibrated) + "\n")
    with atomic_path(args.output) as temporary, open(temporary, "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
