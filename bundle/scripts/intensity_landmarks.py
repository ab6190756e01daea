"""Derive ``scripts.intensity.TRAINING_LANDMARKS``: per modality, the mean brain percentiles of the training images.

Each native (no ``acq-``) image of a simulated BIDS dataset is normalised exactly as training normalises it (the
default percentile method), and its brain's ``LANDMARK_PERCENTILES`` are averaged over the images of that modality.
The table in ``intensity.py`` was made from the default training set (``configs/simulate.yaml``: 20 subjects, seed 0,
the nine training site presets) by

    python -m scripts.intensity_landmarks data/simulated      # from bundle/; prints the table as Python

``--real D`` instead measures the method on a real BIDS dataset (``docs/real_data.md``): Pearson r of the shipped
networks on ``scripts.evaluation.REAL_TASKS`` with their input normalised by the default percentile method and by
``method="landmarks"`` (the source modality's table), block-averaged ``--downsample`` times:

    python -m scripts.intensity_landmarks --real ../../shared/data/real/bids --downsample 4 --output OUT
"""

from __future__ import annotations

import argparse
import os

import nibabel as nib
import numpy as np

from .errors import UserInputError
from .intensity import image_landmarks, normalize_intensity
from .prompt import bids_modality


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


NETWORK_INPUT = ("percentile", "landmarks")  # the normalisations of the network input compared by ``evaluate_real``


def evaluate_real(dataset_dir: str, output_dir: str, downsample: int = 4) -> list[dict[str, object]]:
    """Rows (task, method, normalisation, pearson) of the shipped text and one-hot networks and the baselines on
    ``dataset_dir``'s real-case tasks, with the network input normalised by each method of ``NETWORK_INPUT``.

    Each network runs once per ``TUMSynInferer(input_normalisation=...)``; the metrics, the identity and the
    lookup-table baselines keep the default normalisation, so only the network input differs.
    """
    import torch

    from . import BUNDLE_ROOT
    from .evaluation import REAL_TASKS, Method, downsample_bids, run_evaluation
    from .inference_engine import TUMSynInferer, load_network_weights
    from .tumsyn_net import build_tumsyn_net

    torch.set_num_threads(1)
    data = downsample_bids(dataset_dir, os.path.join(output_dir, "data"), downsample) if downsample > 1 else dataset_dir
    models = os.path.join(BUNDLE_ROOT, "models")
    networks = [Method(name, load_network_weights(build_tumsyn_net(scale="small", conditioning=kind),
                                                  os.path.join(models, weights)))
                for name, kind, weights in (("tumsyn", "text", "model.pt"), ("onehot", "onehot", "model_onehot.pt"))]
    baselines = [Method("identity", None, "identity"), Method("oracle-lut", None, "oracle_lut")]
    rows = []
    for task in REAL_TASKS:
        for normalisation in NETWORK_INPUT:
            inferer = TUMSynInferer(progress=False, input_normalisation=normalisation)
            methods = networks + (baselines if normalisation == "percentile" else [])
            found = run_evaluation(data, os.path.join(output_dir, task.name.replace("->", "-"), normalisation),
                                   methods, inferer, tasks=[task])
            rows += [{"task": r["task"], "method": r["method"], "normalisation": normalisation,
                      "pearson": r["pearson"]} for r in found]
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    """One line per task: each network's r with each input normalisation, then the baselines' r."""
    r = {(row["task"], row["method"], row["normalisation"]): row["pearson"] for row in rows}
    lines = ["| task | tumsyn r (percentile) | tumsyn r (landmarks) | one-hot r (percentile) | one-hot r (landmarks) "
             "| input r | oracle LUT r |", "|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(row["task"] for row in rows):
        columns = (("tumsyn", "percentile"), ("tumsyn", "landmarks"), ("onehot", "percentile"),
                   ("onehot", "landmarks"), ("identity", "percentile"), ("oracle-lut", "percentile"))
        cells = [r.get((task, method, normalisation)) for method, normalisation in columns]
        lines.append(f"| {task} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset_dir", nargs="?", help="simulated BIDS dataset (the training set)")
    parser.add_argument("--real", help="real BIDS dataset: measure the landmark method on it instead")
    parser.add_argument("--downsample", type=int, default=4, help="block-average factor for --real")
    parser.add_argument("--output", default="output/landmarks", help="output folder for --real")
    args = parser.parse_args(argv)
    if args.real:
        print(markdown(evaluate_real(args.real, args.output, args.downsample)))
        return
    if not args.dataset_dir:
        parser.error("give the simulated dataset_dir, or --real")
    table = training_landmarks(args.dataset_dir)
    print("TRAINING_LANDMARKS = {")
    for modality, values in table.items():
        print(f"    {modality!r}: {values},")
    print("}")


if __name__ == "__main__":
    main()
