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

    python ../bench/sim_vs_real.py --real ../../shared/data/real/bids --simulated data/simulated \
        --output ../docs/sim_vs_real.md --limit 9 --realism_subjects 27      # from bundle/
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

# a research tool outside the bundle: the bundle's code comes from its folder, as `monai.bundle run` finds it
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle"))

from scripts.data.intensity import white_matter_peak  # noqa: E402
from scripts.engine.ood import TRAINING_SITES  # noqa: E402
from scripts.engine.volume_io import atomic_path  # noqa: E402
from scripts.errors import UserInputError  # noqa: E402
from scripts.prompt import bids_modality  # noqa: E402
from scripts.simulator import simulate  # noqa: E402

CONTRASTS = ("T1w", "T2w", "FLAIR", "T1CE")
STATISTICS = ("WM/GM", "CSF/GM", "lesion/WM", "peak/p99", "noise", "rim", "z/xy grad")
LESION_FACTOR = 1.3
MIN_LESION_VOXELS = 200


def gmm_tissue_classes(t1w: np.ndarray, mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """Labels 0/1/2 (CSF/GM/WM: T1w darkest to brightest) inside ``mask`` from a 3-component Gaussian mixture on
    intensities clipped at the 99th percentile; -1 outside. Fitted on 200,000 evenly spaced quantiles of those
    intensities (about a second for a 1 mm brain): a deterministic sketch of the histogram. A random subsample made
    the fit flip between solutions on quantised or heavily artefacted images when the mask changed by one voxel."""
    from sklearn.mixture import GaussianMixture

    # Clipped at the 99th percentile: vessels, fat and enhancement would otherwise claim a class of their own.
    values = np.minimum(t1w[mask].astype(np.float64), np.percentile(t1w[mask], 99))
    sample = values if values.size <= 200_000 else _even_quantiles(values, 200_000)
    mixture = GaussianMixture(3, random_state=seed, means_init=np.quantile(sample, [0.1, 0.45, 0.85])[:, None])
    mixture.fit(sample[:, None])
    rank = np.argsort(np.argsort(mixture.means_[:, 0]))
    labels = np.full(t1w.shape, -1, np.int8)
    labels[mask] = rank[mixture.predict(values[:, None])]
    return labels


def _even_quantiles(values: np.ndarray, count: int) -> np.ndarray:
    """``count`` evenly spaced quantiles of ``values`` (linear interpolation, as ``np.quantile``) from one sort:
    ``np.quantile`` partitions per requested quantile, which took seconds to minutes for 200,000 of them."""
    ordered = np.sort(values)
    position = np.linspace(0.0, ordered.size - 1, count)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, ordered.size - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def brain_regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The brain's outer 2-voxel rim and its interior eroded by 3 voxels (shared by a subject's contrasts)."""
    rim = mask & (ndimage.distance_transform_edt(mask) <= 2.0)
    return rim, ndimage.binary_erosion(mask, iterations=3)


def contrast_statistics(image: np.ndarray, labels: np.ndarray, mask: np.ndarray, lesion: np.ndarray,
                        regions: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """The statistics of one image given its subject's segmentation ``labels``, lesion mask and ``brain_regions``
    (computed from ``mask`` when not given)."""
    image = image.astype(np.float32)
    medians = [float(np.median(image[labels == k])) for k in range(3)]
    csf, gm, wm = medians
    brain = image[mask]
    p99 = float(np.percentile(brain, 99))
    white = labels == 2
    differences = np.diff(image, axis=0)[white[1:] & white[:-1]]
    noise = 1.4826 * float(np.median(np.abs(differences - np.median(differences)))) / np.sqrt(2.0)
    rim, inner = brain_regions(mask) if regions is None else regions
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


def subject_statistics(subject_dir: str) -> dict[str, dict[str, float]]:
    """Modality -> statistics for one subject's ``anat`` folder (it needs a T1w)."""
    paths = _images(subject_dir)
    if "T1w" not in paths:
        raise UserInputError(f"{subject_dir}: no T1w image to segment (expected *_T1w.nii[.gz])")
    images = {m: nib.load(p).get_fdata(dtype=np.float32) for m, p in paths.items()}
    mask = images["T1w"] > 0
    for image in images.values():
        mask &= image > 0  # every contrast's brain: the co-registered images' common support
    labels = gmm_tissue_classes(images["T1w"], mask)
    lesion = np.zeros_like(mask)
    if "FLAIR" in images:
        flair = images["FLAIR"]
        lesion = mask & (labels != 0) & (flair > LESION_FACTOR * np.median(flair[labels == 1]))
    regions = brain_regions(mask)
    return {m: contrast_statistics(image, labels, mask, lesion, regions) for m, image in images.items()}


def dataset_statistics(dataset_dir: str, label: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """One row per (subject, contrast): ``source`` (``label``, else the subject's site) and the statistics, for the
    first ``limit`` subjects."""
    participants_tsv = os.path.join(dataset_dir, "participants.tsv")
    if not os.path.isfile(participants_tsv):
        raise UserInputError(f"{dataset_dir}: no participants.tsv (expected a BIDS dataset: configs/simulate.yaml "
                             f"writes one, bench/real_cases.py another)")
    with open(participants_tsv, newline="") as handle:
        participants = list(csv.DictReader(handle, delimiter="\t"))[:limit]
    rows = []
    for participant in participants:
        subject = participant["participant_id"]
        source = label or participant.get("site") or os.path.basename(os.path.normpath(dataset_dir))
        for modality, stats in subject_statistics(os.path.join(dataset_dir, subject, "anat")).items():
            rows.append({"source": source, "subject": subject, "contrast": modality, **stats})
    return rows


def realism_statistics(num_subjects: int, seed: int, voxel_mm: int = 1, keep_dir: str | None = None
                       ) -> list[dict[str, Any]]:
    """Statistics of ``num_subjects`` subjects of the training site presets simulated with ``realism=True``
    (per-subject tissue and skull-strip variation, real-scan artefacts; source suffixed ``+realism``), in a temporary
    folder unless ``keep_dir`` is given."""
    with tempfile.TemporaryDirectory() as temporary:
        folder = keep_dir or temporary
        if not os.path.isfile(os.path.join(folder, "participants.tsv")):
            simulate(folder, num_subjects, seed, sites=list(TRAINING_SITES), voxel_mm=voxel_mm, progress=False,
                     realism=True)
        rows = dataset_statistics(folder, limit=num_subjects)
    return [{**row, "source": row["source"] + " +realism"} for row in rows]


def _range(rows: list[dict[str, Any]], contrast: str, statistic: str) -> tuple[float, float] | None:
    values = [r[statistic] for r in rows if r["contrast"] == contrast and np.isfinite(r[statistic])]
    return (min(values), max(values)) if values else None


# The check tests/test_simulator.py runs in seconds: the real case block-averaged to 2 mm against subjects simulated on
# a 2 mm truth grid (one per training site preset). Partial volume at 2 mm changes the statistics, so only the same
# grid compares, and the doc lists this table apart from the 1 mm one.
REALISM_CHECK = {"num_subjects": 27, "seed": 0}  # the 1 mm table: three subjects per training site preset
HEADING = "## Coverage: is each real value inside the simulated range?"
COARSE_CHECK = {"voxel_mm": 2, "num_subjects": len(TRAINING_SITES), "seed": 0}
COARSE_HEADING = "## Coverage at 2 mm (the test's check)"


def coarse_statistics(real_dir: str, voxel_mm: int, num_subjects: int, seed: int
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Statistics of the real dataset block-averaged ``voxel_mm`` times and of ``realism_statistics`` subjects
    simulated on a ``voxel_mm`` grid."""
    from scripts.engine.evaluation import downsample_bids

    with tempfile.TemporaryDirectory() as temporary:
        real = dataset_statistics(downsample_bids(real_dir, temporary, voxel_mm), label="real")
    return real, realism_statistics(num_subjects, seed, voxel_mm)


def claimed_rows(markdown: str, heading: str) -> set[tuple[str, str]]:
    """(contrast, statistic) of the rows marked covered (``yes``) in the coverage table under ``heading``."""
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0] if heading in markdown else ""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ")]
    if not rows or "covered" not in rows[0]:
        return set()
    column = rows[0].index("covered")
    return {(cells[0], cells[1]) for cells in rows[1:] if cells[column] == "yes"}


def uncovered(real: list[dict[str, Any]], simulated: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
    """(contrast, statistic, real value) of every real value outside the simulated min-max of its row."""
    outside = []
    for contrast in CONTRASTS:
        for statistic in STATISTICS:
            bounds = _range(simulated, contrast, statistic)
            for row in real:
                value = row[statistic]
                if row["contrast"] == contrast and np.isfinite(value) and (
                        bounds is None or not bounds[0] <= value <= bounds[1]):
                    outside.append((contrast, statistic, value))
    return outside


def coverage_table(real: list[dict[str, Any]], *simulated: tuple[str, list[dict[str, Any]]]) -> str:
    """Markdown: per contrast and statistic, the real value(s), each simulated set's range over its subjects,
    whether the last set (the calibrated simulator) covers every real value of the row, and the share of that set's
    subjects below the (first) real value (near 0 % or 100 %: the real value is reachable but atypical)."""
    names = [name for name, _ in simulated]
    missed = {(c, s) for c, s, _ in uncovered(real, simulated[-1][1])}
    lines = ["| contrast | statistic | real | " + " | ".join(f"{n} min-max" for n in names)
             + " | covered | share below real |", "|---|---|---|" + "---|" * (len(names) + 2)]
    for contrast in CONTRASTS:
        for statistic in STATISTICS:
            real_values = [r[statistic] for r in real if r["contrast"] == contrast and np.isfinite(r[statistic])]
            if not real_values:
                continue
            cells = []
            for _, rows in simulated:
                bounds = _range(rows, contrast, statistic)
                cells.append("-" if bounds is None else f"{bounds[0]:.3f}-{bounds[1]:.3f}")
            cells.append("**no**" if (contrast, statistic) in missed else "yes")
            last = [r[statistic] for r in simulated[-1][1] if r["contrast"] == contrast and np.isfinite(r[statistic])]
            cells.append(f"{np.mean(np.array(last) < real_values[0]):.0%}" if last else "-")
            lines.append(f"| {contrast} | {statistic} | {', '.join(f'{v:.3f}' for v in real_values)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


HELDOUT_HEADING = "## Held-out real cases (not seen by the calibration)"


def heldout_section(heldout_dir: str, calibrated: list[dict[str, Any]]) -> str:
    """Markdown: the 1 mm coverage table of real cases the realism ranges were not tuned on, one value per case."""
    heldout = dataset_statistics(heldout_dir, label="held-out")
    subjects = ", ".join(dict.fromkeys(row["subject"] for row in heldout))
    missed = uncovered(heldout, calibrated)
    return (f"\n\n{HELDOUT_HEADING}\n\nThe same statistics on {subjects} (`bench/real_cases.py`: other patients "
            "and scanners than the calibration case, the metastasis case from another pipeline), against the "
            f"`+realism` subjects of the 1 mm table: {len(missed)} of "
            f"{sum(np.isfinite(row[s]) for row in heldout for s in STATISTICS)} values lie outside their row's range. "
            "`real` lists the cases in that order; `share below real` is of the first.\n\n"
            + coverage_table(heldout, ("simulated +realism", calibrated)))


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
    parser.add_argument("--simulated", required=True, help="simulated BIDS dataset (the default simulator)")
    parser.add_argument("--output", required=True, help="Markdown file to write")
    parser.add_argument("--limit", type=int, default=None, help="first N subjects of --simulated only")
    parser.add_argument("--realism_subjects", type=int, default=REALISM_CHECK["num_subjects"],
                        help="subjects simulated with realism=True")
    parser.add_argument("--realism_seed", type=int, default=REALISM_CHECK["seed"],
                        help="seed of the realism simulation")
    parser.add_argument("--realism_dir", default=None, help="keep (or reuse) the realism simulation here")
    parser.add_argument("--heldout", default=None,
                        help="BIDS dataset of real cases the calibration did not see (bench/real_cases.py)")
    args = parser.parse_args(argv)
    real = dataset_statistics(args.real, label="real")
    clean = dataset_statistics(args.simulated, limit=args.limit)
    calibrated = realism_statistics(args.realism_subjects, args.realism_seed, keep_dir=args.realism_dir)
    coarse_real, coarse = coarse_statistics(args.real, **COARSE_CHECK)
    command = (f"python ../bench/sim_vs_real.py --real {args.real} --simulated {args.simulated} --output {args.output}"
               + (f" --limit {args.limit}" if args.limit else "")
               + f" --realism_subjects {args.realism_subjects} --realism_seed {args.realism_seed}"
               + (f" --heldout {args.heldout}" if args.heldout else ""))
    text = ("# Simulated vs real image statistics\n\n" + __doc__.split("\n\n", 1)[1].split("    python")[0]
            + f"\nMade by `{command}` (run from `bundle/`). `simulated`: the default simulator (the training set); "
            "`+realism`: subjects of the training site presets simulated with `realism=True` "
            "(`scripts/simulator/realism.py`: per-subject tissue-parameter and skull-strip variation, magnetisation "
            "transfer on T2w/PD/FLAIR, bright tail, Gibbs ringing, motion ghosting, thick-slice resampling, "
            "cubic registration resampling stored signed, 8-bit storage, arbitrary scale). "
            "`covered`: every real value of the row lies inside the `+realism` min-max; `share below real`: the "
            "share of `+realism` subjects below the real value. The extremes of some ratio rows come from subjects "
            "whose artefacts (8-bit storage, thick slices, bright tail) or infant contrast distort the T1w "
            "segmentation: covered means reachable, and the share says how typical.\n\n"
            f"{HEADING}\n\n"
            + coverage_table(real, ("simulated", clean), ("simulated +realism", calibrated))
            + f"\n\n{COARSE_HEADING}\n\nThe real case block-averaged to {COARSE_CHECK['voxel_mm']} mm against "
            f"{COARSE_CHECK['num_subjects']} subjects (one per training site preset, seed {COARSE_CHECK['seed']}) "
            f"simulated with `realism=True` on a {COARSE_CHECK['voxel_mm']} mm truth grid: "
            "`tests/test_simulator.py` recomputes it and asserts every row marked covered here. Partial volume at "
            "2 mm changes the statistics (the block-averaged real brain edge mixes with the zero background), so "
            "only tables on the same grid compare.\n\n"
            + coverage_table(coarse_real, ("simulated +realism, 2 mm", coarse))
            + (heldout_section(args.heldout, calibrated) if args.heldout else "")
            + "\n\n## Per source (mean over subjects)\n\n" + per_site_table(real + clean + calibrated) + "\n")
    with atomic_path(args.output) as temporary, open(temporary, "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
