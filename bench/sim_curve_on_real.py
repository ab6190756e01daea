"""How far the simulation's grey-level relation between two contrasts carries to a real case.

For each gated real task, the mean target intensity per input-intensity bin is fitted on simulated training subjects
(a global grey-level curve: the most a model can do that only remaps grey levels, as the simulation teaches them),
then applied to the real case's input and scored by Pearson r inside the brain beside the input's own |r| and the
oracle lookup table fitted on the real answer. Inputs are normalised as the inference engine does, targets as the
evaluation does (99th percentile); the mask is evaluate's (source and target non-zero), and again eroded by 2 voxels
(without the skull-strip rim). A measurement only: nothing is fitted on the real case but its oracle.

    .venv/bin/python bench/sim_curve_on_real.py [--subjects 32] [--real ../shared/data/real/bids]
"""

import argparse
import glob
import json
import os
import sys

import nibabel as nib
import numpy as np
from scipy.ndimage import binary_erosion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bundle"))

from scripts.data.intensity import normalize_intensity  # noqa: E402
from scripts.engine.inference_engine import INPUT_NORMALISATION  # noqa: E402
from scripts.engine.metrics import oracle_lookup_table, pearson  # noqa: E402

TASKS = [("T1w", "T2w"), ("T1w", "FLAIR"), ("T2w", "FLAIR"), ("FLAIR", "T1w")]
BIN_EDGES = np.linspace(0.0, 2.0, 81)
MIN_VOXELS_PER_BIN = 20
SAMPLE_STEP = 7  # every 7th brain voxel of each simulated subject


def load(path: str, method: str) -> np.ndarray:
    return np.asarray(normalize_intensity(np.asarray(nib.load(path).dataobj, dtype=np.float32), method=method))


def fitted_curve(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bin centres and the mean target of each bin holding enough voxels."""
    index = np.clip(np.digitize(source, BIN_EDGES) - 1, 0, len(BIN_EDGES) - 2)
    sums = np.bincount(index, target, len(BIN_EDGES) - 1)
    counts = np.bincount(index, None, len(BIN_EDGES) - 1)
    kept = counts >= MIN_VOXELS_PER_BIN
    centres = 0.5 * (BIN_EDGES[1:] + BIN_EDGES[:-1])
    return centres[kept], sums[kept] / counts[kept]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulated", default=os.path.join(ROOT, "bundle", "data", "simulated"))
    parser.add_argument("--real", default=os.path.join(ROOT, "..", "shared", "data", "real", "bids"))
    parser.add_argument("--subjects", type=int, default=32)
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "results", "sim_curve_on_real.json"))
    args = parser.parse_args()
    simulated = sorted(glob.glob(os.path.join(args.simulated, "sub-*")))[: args.subjects]
    (real,) = sorted(glob.glob(os.path.join(args.real, "sub-*")))[:1]
    real_prefix = os.path.join(real, "anat", os.path.basename(real) + "_")
    results = {}
    for source_name, target_name in TASKS:
        sources, targets = [], []
        for subject in simulated:
            prefix = os.path.join(subject, "anat", os.path.basename(subject) + "_")
            source = load(prefix + source_name + ".nii.gz", INPUT_NORMALISATION)
            target = load(prefix + target_name + ".nii.gz", "percentile")
            brain = (source > 0) & (target > 0)
            sources.append(source[brain][::SAMPLE_STEP])
            targets.append(target[brain][::SAMPLE_STEP])
        centres, means = fitted_curve(np.concatenate(sources), np.concatenate(targets))
        source = load(real_prefix + source_name + ".nii.gz", INPUT_NORMALISATION)
        target = load(real_prefix + target_name + ".nii.gz", "percentile")
        curve = np.interp(source, centres, means)
        row = {}
        for region, mask in (("brain", (source > 0) & (target > 0)),
                             ("brain without 2-voxel rim", binary_erosion(source > 0, iterations=2) & (target > 0))):
            row[region] = {"simulated curve": pearson(curve, target, mask),
                           "input |r|": abs(pearson(source, target, mask)),
                           "oracle lookup table": pearson(oracle_lookup_table(source, target, mask), target, mask)}
        results[f"{source_name}->{target_name}"] = row
        print(f"{source_name}->{target_name}: " + "; ".join(
            f"{region}: " + ", ".join(f"{name} {value:.3f}" for name, value in scores.items())
            for region, scores in row.items()), flush=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"simulated_subjects": len(simulated), "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
