"""How much of a real post-contrast T1 can any model predict from the pre-contrast T1w? (docs/real_data.md)

    python bench/t1ce_predictability.py ../shared/data/real/bids HELDOUT_DIR [--downsample 4]

For every subject with a T1w and a ce-gadolinium T1w (both divided by their 99th percentile inside the brain: the
voxels where both are non-zero), the T1CE's residual after the least-squares line through the T1w is what a
synthesis must add to beat the input. It is regressed (least squares, a diagnostic: nothing here ships) on features
of the T1w alone: the grey level and box statistics around each voxel (mean, max, min over 3, 5, 7 voxels),
distances to the brain's edge and to its mid-sagittal plane, and position in the brain's box (quadratic, left-right
symmetric). Leave one subject out: fitted on the others, scored on it. Prints, per subject and feature set, the
correlation of the fitted with the true residual and the Pearson r of T1w + k * fit against the T1CE for
k = 0.25, 0.5, 1 (the input's own r beside), and the same fitted on the subject itself (the ceiling of these
features). Writes ``bench/results/t1ce_predictability.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))

from scripts.engine.evaluation import bids_image, downsample_bids  # noqa: E402
from scripts.engine.volume_io import load_volume  # noqa: E402

FEATURE_SETS = {"grey level and box statistics": ("local",), "+ edge and midline distance": ("local", "distance"),
                "+ position in the brain's box": ("local", "distance", "position")}
BLEND_WEIGHTS = (0.25, 0.5, 1.0)


def features(t1w: np.ndarray, mask: np.ndarray, affine: np.ndarray, kinds: tuple[str, ...]) -> np.ndarray:
    """One row per brain voxel: the T1w-only features of ``kinds`` (and a constant)."""
    columns = [t1w]
    if "local" in kinds:
        for size in (3, 5, 7):
            columns += [f(t1w, size) for f in (ndimage.uniform_filter, ndimage.maximum_filter, ndimage.minimum_filter)]
    head = t1w > 0
    world = np.einsum("ij,j...->i...", affine[:3, :3], np.indices(t1w.shape)) + affine[:3, 3, None, None, None]
    centre = np.array([w[head].mean() for w in world])
    spacing = float(np.abs(affine[:3, :3]).sum(axis=0).mean())
    if "distance" in kinds:
        edge_mm = ndimage.distance_transform_edt(head) * spacing
        midline_mm = np.abs(world[0] - centre[0])  # world x is left-right in both LPS and RAS files
        columns += [np.exp(-d / width) for d in (edge_mm, midline_mm) for width in (4.0, 8.0, 16.0)]
    if "position" in kinds:
        extent = np.array([np.ptp(w[head]) for w in world])
        x, y, z = (np.abs(world[0] - centre[0]) / extent[0], *((world[i] - centre[i]) / extent[i] for i in (1, 2)))
        columns += [x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]
    return np.stack([c[mask] for c in columns] + [np.ones(int(mask.sum()))], axis=1)


def subject_data(dataset_dir: str, subject: str) -> dict | None:
    paths = [bids_image(dataset_dir, subject, modality) for modality in ("T1w", "T1CE")]
    if not all(os.path.isfile(path) for path in paths):
        return None
    t1w, t1ce = (load_volume(path) for path in paths)
    mask = (t1w.array != 0) & (t1ce.array != 0)
    source, target = (v.array / np.percentile(v.array[mask], 99) for v in (t1w, t1ce))
    design = np.stack([source[mask], np.ones(int(mask.sum()))], axis=1)
    residual = target[mask] - design @ np.linalg.lstsq(design, target[mask], rcond=None)[0]
    return {"source": source, "target": target[mask], "mask": mask, "affine": t1w.affine, "residual": residual}


def scores(data: dict, fit: np.ndarray) -> dict:
    source = data["source"][data["mask"]]
    return {"rho": float(np.corrcoef(fit, data["residual"])[0, 1]),
            "input_r": float(np.corrcoef(source, data["target"])[0, 1]),
            **{f"r_k{k:g}": float(np.corrcoef(source + k * fit, data["target"])[0, 1]) for k in BLEND_WEIGHTS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dirs", nargs="+", help="BIDS datasets of co-registered real scans")
    parser.add_argument("--downsample", type=int, default=4, help="block-average factor (4: the tests' 4 mm)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results",
                                                         "t1ce_predictability.json"))
    args = parser.parse_args()
    subjects = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, dataset in enumerate(args.dataset_dirs):
            small = downsample_bids(dataset, os.path.join(scratch, str(index)), args.downsample)
            for subject in sorted(name for name in os.listdir(small) if name.startswith("sub-")):
                data = subject_data(small, subject)
                if data is not None:
                    subjects[subject] = data
    if len(subjects) < 2:
        raise SystemExit(f"{args.dataset_dirs}: need two or more subjects with T1w and ce-gadolinium T1w")
    results = {}
    for name, kinds in FEATURE_SETS.items():
        design = {s: features(d["source"], d["mask"], d["affine"], kinds) for s, d in subjects.items()}
        for held_out, data in subjects.items():
            others = [s for s in subjects if s != held_out]
            coef = np.linalg.lstsq(np.concatenate([design[s] for s in others]),
                                   np.concatenate([subjects[s]["residual"] for s in others]), rcond=None)[0]
            own = np.linalg.lstsq(design[held_out], data["residual"], rcond=None)[0]
            row = {"left_out": scores(data, design[held_out] @ coef), "in_sample": scores(data, design[held_out] @ own)}
            results.setdefault(name, {})[held_out] = row
            cells = " ".join(f"k{k:g} {row['left_out'][f'r_k{k:g}']:.4f}" for k in BLEND_WEIGHTS)
            print(f"{name:32s} {held_out:18s} input r {row['left_out']['input_r']:.4f} | left out: rho "
                  f"{row['left_out']['rho']:+.3f} {cells} | in sample: rho {row['in_sample']['rho']:.3f} "
                  f"r k1 {row['in_sample']['r_k1']:.4f}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"downsample": args.downsample, "datasets": args.dataset_dirs, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
