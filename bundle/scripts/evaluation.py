"""Benchmark of ``configs/evaluate.yaml``: the paper's tasks on held-out subjects, against baselines.

Every case is (subject, task, method): the method predicts the task's target image from the task's source image
and the target's own prompt (read from its sidecar, as a user would write it); the prediction is resampled onto
the target's grid and compared inside the simulator's brain mask (``scripts.metrics``). Methods: ``tumsyn`` (the
shipped model), ``onehot`` (the same network conditioned on the target modality only) when its weights exist, and
``identity`` (the source itself, normalised and trilinearly resampled), the floor any synthesis must beat.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import map_coordinates

from .inference_engine import TUMSynInferer, load_network_weights, synthesize_image
from .intensity import normalize_intensity
from .metrics import compare, tissue_volumes
from .prompt import BIDS_SUFFIX, prompt_from_bids
from .volume_io import atomic_path, load_volume

logger = logging.getLogger(__name__)

TRUTH_DERIVATIVE = "simulator"


@dataclass(frozen=True)
class Task:
    """Synthesize ``target`` from ``source`` on the subjects of ``sites`` (all subjects when empty).

    ``source_acq`` names a clinical thick-slice acquisition (its BIDS ``acq-`` label) as the source.
    """

    name: str
    source: str
    target: str
    sites: tuple[str, ...] = ()
    source_acq: str | None = None
    group: str = "synthesis"  # synthesis (paper Table 1), sr (joint super-resolution, Fig. 3/4), zero-shot


# The paper's Table 1 tasks on sites like the paper's; its joint super-resolution cases (Fig. 3: 3.2 mm coronal PD
# -> 1 mm T1w; Fig. 4: 5 mm axial FLAIR -> 1 mm T1w on ADNI, a site held out of training); zero-shot cases on the
# ``unseen-params`` preset, whose TE/TR/TI lie outside every training range.
TASKS = (
    Task("PD->FLAIR", "PD", "FLAIR", ("AIBL",)),
    Task("T1w->T2w", "T1w", "T2w", ("HCP-D",)),
    Task("FLAIR->T1CE", "FLAIR", "T1CE", ("BraTS2021",)),
    Task("T2w->FLAIR", "T2w", "FLAIR", ("clinical",)),
    Task("T1w->PD", "T1w", "PD", ("IXI",)),
    Task("T1w->SWI", "T1w", "SWI", ("OASIS",)),
    Task("T2w->T2star", "T2w", "T2star", ("OASIS",)),
    Task("cor3.2mm PD->T1w", "PD", "T1w", ("IXI", "clinical"), "cor3p2mm", "sr"),
    Task("ax5mm FLAIR->T1w (ADNI, unseen site)", "FLAIR", "T1w", ("ADNI",), "ax5mm", "zero-shot"),
    Task("T1w->T2w (unseen TE)", "T1w", "T2w", ("unseen-params",), group="zero-shot"),
    Task("T1w->FLAIR (unseen TR/TE/TI)", "T1w", "FLAIR", ("unseen-params",), group="zero-shot"),
    Task("T1w->PD (unseen TE)", "T1w", "PD", ("unseen-params",), group="zero-shot"),
)
EVALUATION_SITES = ("AIBL", "HCP-D", "BraTS2021", "clinical", "IXI", "OASIS", "ADNI", "unseen-params")


def tasks_named(names: Sequence[str] | None) -> tuple[Task, ...]:
    """The tasks called ``names`` (all when None); an unknown name is an error listing the known ones."""
    if names is None:
        return TASKS
    known = {task.name: task for task in TASKS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"evaluate tasks: unknown {unknown}; expected some of {list(known)}")
    return tuple(known[name] for name in names)


def bids_image(dataset_dir: str, subject: str, modality: str, acq: str | None = None) -> str:
    entities = [subject] + ([f"acq-{acq}"] if acq else []) + (["ce-gadolinium"] if modality == "T1CE" else [])
    name = "_".join(entities + [BIDS_SUFFIX[modality]]) + ".nii.gz"
    return os.path.join(dataset_dir, subject, "anat", name)


def _participants(dataset_dir: str) -> list[dict[str, str]]:
    path = os.path.join(dataset_dir, "participants.tsv")
    if not os.path.isfile(path):
        raise ValueError(f"{dataset_dir}: not a BIDS dataset (no participants.tsv)")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def resample_to(image: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray,
                order: int = 1) -> np.ndarray:
    """``image`` (on ``affine``) sampled at the voxel centres of the grid (``shape``, ``target_affine``)."""
    if tuple(image.shape) == tuple(shape) and np.allclose(affine, target_affine, atol=1e-4):
        return image.astype(np.float32)
    voxel_to_voxel = np.linalg.inv(affine) @ target_affine
    return map_coordinates(image.astype(np.float32), _grid_points(shape, voxel_to_voxel), order=order,
                           mode="nearest").reshape(shape)


def _grid_points(shape: Sequence[int], transform: np.ndarray) -> np.ndarray:
    index = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return transform[:3, :3] @ index + transform[:3, 3:4]


@dataclass
class Method:
    name: str
    network: torch.nn.Module | None  # None: the identity baseline


def load_methods(build_network, ckpt_path: str, onehot_ckpt_path: str | None) -> list[Method]:
    """The shipped model, the one-hot ablation when its weights exist, and the identity baseline."""
    methods = [Method("tumsyn", load_network_weights(build_network("text"), ckpt_path))]
    if onehot_ckpt_path and os.path.isfile(onehot_ckpt_path):
        methods.append(Method("onehot", load_network_weights(build_network("onehot"), onehot_ckpt_path)))
    else:
        logger.warning("one-hot ablation weights %s not found: that baseline is left out", onehot_ckpt_path)
    methods.append(Method("identity", None))
    return methods


def _predict(method: Method, source_path: str, target_prompt, inferer: TUMSynInferer,
             target_shape: Sequence[int], target_affine: np.ndarray) -> np.ndarray:
    volume = load_volume(source_path)
    if method.network is None:
        image, affine = normalize_intensity(volume.array), volume.affine
    else:
        image, affine = synthesize_image(volume, target_prompt, method.network, inferer)
    return resample_to(image, affine, target_shape, target_affine)


def evaluate_case(dataset_dir: str, subject: str, task: Task, methods: Sequence[Method],
                  inferer: TUMSynInferer) -> list[dict[str, Any]]:
    source = bids_image(dataset_dir, subject, task.source, task.source_acq)
    target = bids_image(dataset_dir, subject, task.target)
    if not (os.path.isfile(source) and os.path.isfile(target)):
        return []
    reference = nib.load(target)
    truth = reference.get_fdata(dtype=np.float32)
    mask_path = os.path.join(dataset_dir, "derivatives", TRUTH_DERIVATIVE, subject, "anat",
                             f"{subject}_desc-brain_mask.nii.gz")
    mask = (nib.load(mask_path).get_fdata() > 0.5) if os.path.isfile(mask_path) else truth != 0
    mask &= truth != 0
    voxel_ml = float(abs(np.linalg.det(reference.affine[:3, :3]))) / 1000.0
    prompt = prompt_from_bids(target)
    rows = []
    for method in methods:
        prediction = _predict(method, source, prompt, inferer, truth.shape, reference.affine)
        row = {"subject": subject, "task": task.name, "group": task.group, "method": method.name,
               **compare(prediction, truth, mask)}
        if task.target == "T1w":  # downstream: tissue volumes on the synthesized vs the real T1w
            real, synthesized = tissue_volumes(truth, mask, voxel_ml), tissue_volumes(prediction, mask, voxel_ml)
            row["volume_error_pct"] = float(np.mean(np.abs(synthesized - real) / real) * 100.0)
        rows.append(row)
        logger.info("%s %s %s: PSNR %.2f dB SSIM %.3f", subject, task.name, method.name, row["psnr"], row["ssim"])
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation of each measure per (task, method)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"]), []).append(row)
    summary = []
    for (task, method), members in groups.items():
        entry: dict[str, Any] = {"task": task, "method": method, "group": members[0]["group"], "n": len(members)}
        for key in ("psnr", "ssim", "pearson", "volume_error_pct"):
            values = [m[key] for m in members if key in m]
            if values:
                entry[f"{key}_mean"], entry[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
        summary.append(entry)
    return summary


def _write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    methods = list(dict.fromkeys(s["method"] for s in summary))
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    cell = {(s["task"], s["method"]): s for s in summary}
    lines = ["| task | " + " | ".join(f"{m} PSNR (dB) | {m} SSIM" for m in methods) + " |",
             "|---|" + "---|---|" * len(methods)]
    for task in tasks:
        values = []
        for method in methods:
            s = cell.get((task, method))
            values += ["-", "-"] if s is None else [f"{s['psnr_mean']:.2f} ± {s['psnr_std']:.2f}",
                                                    f"{s['ssim_mean']:.3f} ± {s['ssim_std']:.3f}"]
        lines.append(f"| {task} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _write_figure(path: str, summary: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(s["method"] for s in summary))
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    cell = {(s["task"], s["method"]): s for s in summary}
    figure, axis = plt.subplots(figsize=(1.2 * len(tasks) + 2, 4))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        means = [cell[(t, method)]["psnr_mean"] if (t, method) in cell else np.nan for t in tasks]
        stds = [cell[(t, method)]["psnr_std"] if (t, method) in cell else 0 for t in tasks]
        axis.bar(np.arange(len(tasks)) + k * width, means, width, yerr=stds, label=method)
    axis.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=30, ha="right")
    axis.set_ylabel("PSNR (dB), brain mask")
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)


def run_evaluation(dataset_dir: str, output_dir: str, methods: Sequence[Method], inferer: TUMSynInferer,
                   tasks: Sequence[Task] = TASKS, subjects: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Evaluate every task on every subject that has its images; write metrics.csv, metrics.md and metrics.png."""
    participants = _participants(dataset_dir)
    chosen = [p for p in participants if subjects is None or p["participant_id"] in subjects]
    if not chosen:
        raise ValueError(f"{dataset_dir}: no subjects to evaluate (asked for {subjects})")
    rows = []
    for participant in chosen:
        for task in tasks:
            if task.sites and participant.get("site") not in task.sites:
                continue
            for row in evaluate_case(dataset_dir, participant["participant_id"], task, methods, inferer):
                rows.append({"site": participant.get("site", ""), **row})
    if not rows:
        raise ValueError(f"{dataset_dir}: none of the tasks' source/target images exist for the chosen subjects")
    os.makedirs(output_dir, exist_ok=True)
    summary = summarise(rows)
    _write_csv(os.path.join(output_dir, "metrics.csv"), rows)
    _write_csv(os.path.join(output_dir, "summary.csv"), summary)
    note = ("Intensities: each image divided by its brain 99th percentile, clipped to [0, 1.5]; PSNR with data range "
            "1.0 over the brain mask; SSIM 3D (Gaussian window 11) over the brain bounding box, background 0.\n\n")
    with atomic_path(os.path.join(output_dir, "metrics.md")) as temporary, open(temporary, "w") as handle:
        handle.write(note + markdown_table(summary) + "\n")
    _write_figure(os.path.join(output_dir, "metrics.png"), summary)
    return rows
