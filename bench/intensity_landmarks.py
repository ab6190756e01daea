"""Derive ``scripts.data.intensity.TRAINING_LANDMARKS``: per modality, the mean brain percentiles of the training
images.

Each native (no ``acq-``) image of a simulated BIDS dataset is normalised exactly as training normalises it (the
default percentile method), and its brain's ``LANDMARK_PERCENTILES`` are averaged over the images of that modality.
The table in ``intensity.py`` was made from the default training set (``configs/simulate.yaml``: 20 subjects, seed 0,
the nine training site presets) by

    python ../bench/intensity_landmarks.py data/simulated      # from bundle/; prints the table as Python

It serves ``normalize_intensity(method="landmarks")``, a training-side normalisation (``stage2_train.yaml``'s
``intensity_normalisation``); inference does not use it.
"""

from __future__ import annotations

import argparse
import os
import sys

import nibabel as nib
import numpy as np

# a research tool outside the bundle: the bundle's code comes from its folder, as `monai.bundle run` finds it
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle"))

from scripts.data.intensity import image_landmarks, normalize_intensity  # noqa: E402
from scripts.errors import UserInputError  # noqa: E402
from scripts.prompt import bids_modality  # noqa: E402


def training_landmarks(dataset_dir: str) -> dict[str, tuple[float, ...]]:
    """Modality -> mean landmarks over the dataset's native images of that modality (``sub-*/anat``)."""
    per_modality: dict[str, list[np.ndarray]] = {}
    subjects = sorted(s for s in os.listdir(dataset_dir) if s.startswith("sub-")) if os.path.isdir(dataset_dir) else []
    for subject in subjects:
        anat = os.path.join(dataset_dir, subject, "anat")
        for name in sorted(os.listdir(anat)):
            modality = bids_modality(name)
            if modality is None or "_acq-" in name or not name.endswith((".nii", ".nii.gz")):
                continue
            image = nib.load(os.path.join(anat, name)).get_fdata(dtype=np.float32)
            normalised = normalize_intensity(image)
            per_modality.setdefault(modality, []).append(image_landmarks(normalised[image != 0]))
    if not per_modality:
        raise UserInputError(f"{dataset_dir}: no BIDS images under sub-*/anat to derive landmarks from")
    return {m: tuple(round(float(v), 4) for v in np.mean(found, axis=0)) for m, found in sorted(per_modality.items())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset_dir", help="simulated BIDS dataset (the training set)")
    args = parser.parse_args(argv)
    table = training_landmarks(args.dataset_dir)
    print("TRAINING_LANDMARKS = {")
    for modality, values in table.items():
        print(f"    {modality!r}: {values},")
    print("}")


if __name__ == "__main__":
    main()
