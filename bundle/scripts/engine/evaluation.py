"""Benchmark of ``configs/evaluate.yaml``: synthesis tasks on held-out subjects, against baselines.

Every case is (subject, task, method): the method predicts the task's target image from the task's source image
and the target's own prompt (read from its sidecar, as a user would write it, ``None`` where a value is unknown);
the prediction is resampled onto the target's grid and compared inside the brain (``scripts.engine.metrics``): the
simulator's brain mask on simulated data, elsewhere the voxels where target and source are both non-zero.
Methods: ``tumsyn`` (the shipped model), ``onehot`` (the same network conditioned on the target modality only) when
its weights exist, ``task-specific`` (the one-hot network trained on one (source, target) pair only, run on the cases
of that pair, a thick-slice source included, since training degrades every source patch as a clinical scan) when
its weights exist, ``identity`` (the source itself, normalised and trilinearly resampled), the floor any synthesis
must beat, and ``oracle-lut`` (each source intensity bin mapped to the mean target of that bin, fitted on the
target itself), the ceiling of any voxel-wise intensity mapping.

Inputs: a BIDS dataset (simulated: the paper's tasks on their sites; real, without the simulator's derivatives:
``REAL_TASKS`` on every subject that has the images), or a datalist of (input, target) pairs (``load_pairs``).
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
from monai.bundle import ConfigParser
from scipy.ndimage import map_coordinates

from ..data.bids_data import parse_tasks
from ..data.intensity import normalize_intensity
from ..errors import UserInputError, config_null, one_line
from ..prompt import BIDS_SUFFIX, MODALITIES, Prompt, PromptError, bids_modality, prompt_from_bids, prompt_from_image
from ..simulator import simulate
from .inference_engine import (
    INPUT_NORMALISATION,
    load_network_weights,
    read_datalist_rows,
    synthesize_image,
    target_prompt,
)
from .metrics import compare, oracle_lookup_table, tissue_volumes
from .synthesis_engine import TUMSynInferer
from .volume_io import atomic_path, load_volume, save_nifti

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
# -> 1 mm T1w; Fig. 4: 5 mm axial FLAIR -> 1 mm T1w on ADNI, a site held out of training) and super-resolution
# within one contrast (a clinical thick-slice scan -> 1 mm of the same contrast); zero-shot cases on the
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
    Task("sag4mm T1w->T1w", "T1w", "T1w", ("clinical",), "sag4mm", "sr"),
    Task("ax5mm FLAIR->FLAIR", "FLAIR", "FLAIR", ("clinical", "ADNI"), "ax5mm", "sr"),
    Task("ax5mm FLAIR->T1w (ADNI, unseen site)", "FLAIR", "T1w", ("ADNI",), "ax5mm", "zero-shot"),
    Task("T1w->T2w (unseen TE)", "T1w", "T2w", ("unseen-params",), group="zero-shot"),
    Task("T1w->FLAIR (unseen TR/TE/TI)", "T1w", "FLAIR", ("unseen-params",), group="zero-shot"),
    Task("T1w->PD (unseen TE)", "T1w", "PD", ("unseen-params",), group="zero-shot"),
)
EVALUATION_SITES = ("AIBL", "HCP-D", "BraTS2021", "clinical", "IXI", "OASIS", "ADNI", "unseen-params")
# Real co-registered scans (issue #11): every subject that has both images, whatever its site.
REAL_TASKS = tuple(Task(f"{source}->{target}", source, target, group="real") for source, target in
                   (("T1w", "T2w"), ("T1w", "FLAIR"), ("T1w", "T1CE"), ("T2w", "FLAIR"), ("FLAIR", "T1w")))


def is_simulated(dataset_dir: str) -> bool:
    """Whether ``dataset_dir`` was written by the simulator (it keeps the ground truth under derivatives/)."""
    return os.path.isdir(os.path.join(dataset_dir, "derivatives", TRUTH_DERIVATIVE))


def tasks_for(dataset_dir: str, names: Sequence[str] | None = None) -> tuple[Task, ...]:
    """The task catalogue that fits the dataset (simulated: ``TASKS``; real: ``REAL_TASKS``), or its tasks ``names``."""
    return tasks_named(names, TASKS if is_simulated(dataset_dir) else REAL_TASKS)


def evaluation_tasks(dataset_dir: str, names: Sequence[str] | None = None, thicken: int | str = 0
                     ) -> tuple[Task, ...]:
    """``tasks_for``, or with ``thicken`` (a number of slices) the super-resolution tasks of ``thicken_bids``."""
    if str(thicken) in ("0", "None", "null", "false", "False"):
        return tasks_for(dataset_dir, names)
    if not str(thicken).isdigit() or int(thicken) < 2:
        raise UserInputError(f"thicken: expected 0 or a whole number of slices >= 2, got {thicken!r}")
    return tasks_named(names, thick_slice_tasks(int(thicken)))


def tasks_named(names: Sequence[str] | None, catalogue: Sequence[Task] = TASKS) -> tuple[Task, ...]:
    """The tasks of ``catalogue`` called ``names`` (all when None); an unknown name is an error listing the known
    ones."""
    if names is None:
        return tuple(catalogue)
    known = {task.name: task for task in catalogue}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserInputError(f"evaluate tasks: unknown {unknown}; expected some of {list(known)}")
    return tuple(known[name] for name in names)


def bids_image(dataset_dir: str, subject: str, modality: str, acq: str | None = None) -> str:
    entities = [subject] + ([f"acq-{acq}"] if acq else []) + (["ce-gadolinium"] if modality == "T1CE" else [])
    name = "_".join(entities + [BIDS_SUFFIX[modality]]) + ".nii.gz"
    return os.path.join(dataset_dir, subject, "anat", name)


def _participants(dataset_dir: str) -> list[dict[str, str]]:
    path = os.path.join(dataset_dir, "participants.tsv")
    if not os.path.isfile(path):
        raise UserInputError(f"{dataset_dir}: not a BIDS dataset (no participants.tsv)")
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
    network: torch.nn.Module | None  # None: a baseline, ``kind`` says which
    kind: str = "network"  # network | identity | oracle_lut
    task: tuple[str, str] | None = None  # (source, target) modalities of a task-specific model; None: every case

    def applies_to(self, task: Task) -> bool:
        return self.task is None or self.task == (task.source, task.target)


TASK_SPECIFIC = "task-specific"


def load_methods(build_network, ckpt_path: str, onehot_ckpt_path: str | None,
                 task_models: dict[str, str] | None = None) -> list[Method]:
    """The shipped model, the one-hot ablation and the task-specific models (``{'T2w->FLAIR': path}``, one-hot
    networks) whose weights exist, the identity and the oracle-LUT baselines. ``task_models`` None, or the word
    ``null``/``none`` as a command line passes it, leaves them out."""
    task_models = config_null(task_models)
    if task_models is not None and not isinstance(task_models, dict):
        raise UserInputError(f"task_models: expected a mapping of 'source->target' to weights files, or null; got "
                             f"{task_models!r}")
    task_models = dict(task_models or {})
    pairs = parse_tasks(list(task_models), "task_models") if task_models else []  # a bad name fails before loading
    methods = [Method("tumsyn", load_network_weights(build_network("text"), ckpt_path))]
    if onehot_ckpt_path and os.path.isfile(onehot_ckpt_path):
        methods.append(Method("onehot", load_network_weights(build_network("onehot"), onehot_ckpt_path)))
    else:
        logger.warning("one-hot ablation weights %s not found: that baseline is left out", onehot_ckpt_path)
    for (source, target), path in zip(pairs, task_models.values()):
        pair = (MODALITIES[source], MODALITIES[target])
        if path and os.path.isfile(path):
            methods.append(Method(TASK_SPECIFIC, load_network_weights(build_network("onehot"), path), task=pair))
        else:
            logger.warning("task-specific %s->%s weights %s not found: that baseline is left out", *pair, path)
    methods += [Method("identity", None, "identity"), Method("oracle-lut", None, "oracle_lut")]
    return methods


def inference_inferer(bundle_root: str, **settings) -> TUMSynInferer:
    """The inferer of ``configs/inference.yaml`` without its progress bar, with those of its top-level ``settings``
    that are not None (``device``, ``scale``, its test-time options) replaced: evaluation synthesizes as inference."""
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_root, "configs", "inference.yaml"))
    parser.update({key: value for key, value in settings.items() if value is not None})
    parser["inferer#progress"] = False
    return parser.get_parsed_content("inferer")


@dataclass(frozen=True)
class Case:
    """One (source, target) pair to evaluate; ``mask_path`` is the brain mask when one is known."""

    subject: str
    task: Task
    source_path: str
    target_path: str
    prompt: Prompt
    mask_path: str | None = None
    site: str = ""


def _resampled_source(source_path: str, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    volume = load_volume(source_path)
    return resample_to(normalize_intensity(volume.array), volume.affine, shape, affine)


def _predict(method: Method, case: Case, inferer: TUMSynInferer, source: np.ndarray, truth: np.ndarray,
             mask: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    if method.kind == "identity":
        return source
    if method.kind == "oracle_lut":
        return oracle_lookup_table(source, truth, mask)
    image, affine = synthesize_image(load_volume(case.source_path), case.prompt, method.network, inferer,
                                     source_modality=case.task.source)
    return resample_to(image, affine, truth.shape, target_affine)


def bids_case(dataset_dir: str, subject: str, task: Task, site: str = "") -> Case | None:
    """The case of ``task`` on a BIDS subject, or None when the subject lacks one of its images."""
    source = bids_image(dataset_dir, subject, task.source, task.source_acq)
    target = bids_image(dataset_dir, subject, task.target)
    if not (os.path.isfile(source) and os.path.isfile(target)):
        return None
    mask = os.path.join(dataset_dir, "derivatives", TRUTH_DERIVATIVE, subject, "anat",
                        f"{subject}_desc-brain_mask.nii.gz")
    return Case(subject, task, source, target, prompt_from_bids(target), mask if os.path.isfile(mask) else None, site)


# The simulator's tissue fractions grouped as the three classes a T1w k-means separates (darkest to brightest):
# deep grey matter counts as grey matter, white-matter hyperintensities as white matter (the tissue they replace).
# The first map of each class is required; the others exist only where the subject has that tissue or lesion.
TRUTH_TISSUE_CLASSES = (("CSF",), ("GM", "deepGM"), ("WM", "WMH"))


def truth_tissue_volumes(mask_path: str, shape: Sequence[int], affine: np.ndarray, mask: np.ndarray,
                         voxel_ml: float) -> np.ndarray | None:
    """CSF, GM, WM volumes (mL) inside ``mask`` from the simulator's probability maps beside its brain mask
    ``mask_path`` (resampled to the target grid), or None when a map is missing (real data)."""
    prefix = mask_path[:-len("desc-brain_mask.nii.gz")]
    volumes = []
    for labels in TRUTH_TISSUE_CLASSES:
        paths = [f"{prefix}label-{label}_probseg.nii.gz" for label in labels]
        if not os.path.isfile(paths[0]):
            return None
        paths = [path for path in paths if os.path.isfile(path)]
        fraction = sum(resample_to(v.array, v.affine, shape, affine) for v in map(load_volume, paths))
        volumes.append(float(np.clip(fraction, 0.0, 1.0)[mask].sum()) * voxel_ml)
    return np.array(volumes)


def _volume_error_pct(volumes: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean(np.abs(volumes - reference) / reference) * 100.0)


def evaluate_case(case: Case, methods: Sequence[Method], inferer: TUMSynInferer) -> list[dict[str, Any]]:
    """Every method's scores on one case, inside the brain: the known mask, else target and source both non-zero."""
    reference = load_volume(case.target_path)  # checked like an input: a corrupt target is a one-line error
    truth = reference.array
    source = _resampled_source(case.source_path, truth.shape, reference.affine)
    if case.mask_path is not None:
        mask = (load_volume(case.mask_path).array > 0.5) & (truth != 0)
    else:
        mask = (truth != 0) & (source != 0)
    if mask.sum() < 27:
        raise UserInputError(f"{case.target_path}: fewer than 27 voxels where target and source "
                             f"{case.source_path} are both non-zero; are the two images co-registered?")
    voxel_ml = float(abs(np.linalg.det(reference.affine[:3, :3]))) / 1000.0
    # downstream check (paper Table 2) on T1w targets: tissue volumes of a 3-class k-means on the synthesized and the
    # real image, each against the simulator's ground truth when it is known, and against each other
    downstream = case.task.target == "T1w"
    real_volumes = tissue_volumes(truth, mask, voxel_ml) if downstream else None
    truth_volumes = (truth_tissue_volumes(case.mask_path, truth.shape, reference.affine, mask, voxel_ml)
                     if downstream and case.mask_path else None)
    rows = []
    for method in (m for m in methods if m.applies_to(case.task)):
        prediction = _predict(method, case, inferer, source, truth, mask, reference.affine)
        row = {"site": case.site, "subject": case.subject, "task": case.task.name, "group": case.task.group,
               "method": method.name, **compare(prediction, truth, mask)}
        if downstream:
            synthesized = tissue_volumes(prediction, mask, voxel_ml)
            row["volume_error_pct"] = _volume_error_pct(synthesized, real_volumes)
            if truth_volumes is not None:
                row["truth_volume_error_pct"] = _volume_error_pct(synthesized, truth_volumes)
                row["real_truth_volume_error_pct"] = _volume_error_pct(real_volumes, truth_volumes)
        rows.append(row)
        logger.info("%s %s %s: PSNR %.2f dB SSIM %.3f r %.3f", case.subject, case.task.name, method.name,
                    row["psnr"], row["ssim"], row["pearson"])
    return rows


def bids_cases(dataset_dir: str, tasks: Sequence[Task], subjects: Sequence[str] | None = None) -> list[Case]:
    """The cases of ``tasks`` on the dataset's subjects that have both of a task's images. A task with sites runs on
    the subjects of those sites, or on every subject when the dataset has none of them (a user's own dataset)."""
    participants = _participants(dataset_dir)
    chosen = [p for p in participants if subjects is None or p["participant_id"] in subjects]
    if not chosen:
        raise UserInputError(f"{dataset_dir}: no subjects to evaluate (asked for {subjects})")
    sites = {participant.get("site") for participant in chosen}
    cases = []
    for participant in chosen:
        for task in tasks:
            if sites & set(task.sites) and participant.get("site") not in task.sites:
                continue
            case = bids_case(dataset_dir, participant["participant_id"], task, participant.get("site") or "")
            if case is not None:
                cases.append(case)
    if not cases:
        raise UserInputError(f"{dataset_dir}: none of the tasks' source/target images exist for the chosen subjects")
    return cases


PAIR_KEYS = ("input", "target", "prompt", "task", "mask", "subject")


def load_pairs(path: str) -> list[Case]:
    """Cases from a datalist of (input, target) pairs: a JSON list (or ``{"data": [...]}``) or a CSV with a header.

    Each entry needs ``input`` and ``target`` (co-registered image paths, relative to the datalist's folder or
    absolute); optional ``prompt`` (the template or a modality name; default: read from the target's BIDS name and
    sidecar), ``task`` (default ``"<source>-><target modality>"``), ``mask`` (default: both images non-zero) and
    ``subject``.
    """
    entries = read_datalist_rows(path)
    if not entries:
        raise UserInputError(f"{path}: expected a non-empty list of {{'input': ..., 'target': ...}} entries")
    folder = os.path.dirname(os.path.abspath(path))
    cases = []
    for number, entry in enumerate(entries):
        where = f"{path} entry {number}"
        if not isinstance(entry, dict) or not entry.get("input") or not entry.get("target"):
            raise UserInputError(f"{where}: expected the keys 'input' and 'target' (image paths), got {entry!r}")
        unknown = set(entry) - set(PAIR_KEYS)
        if unknown:
            raise UserInputError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {list(PAIR_KEYS)}")
        source, target = (os.path.join(folder, entry[key]) for key in ("input", "target"))
        for image in (source, target):
            if not os.path.isfile(image):
                raise UserInputError(f"{where}: no such image file {image}")
        prompt = _pair_prompt(entry.get("prompt"), target, where)
        source_name = bids_modality(source) or "input"
        name = entry.get("task") or f"{source_name}->{prompt.modality}"
        task = Task(name, source_name, prompt.modality, group="pairs")
        mask = os.path.join(folder, entry["mask"]) if entry.get("mask") else None
        cases.append(Case(entry.get("subject") or f"pair-{number}", task, source, target, prompt, mask))
    return cases


def _pair_prompt(text: str | None, target: str, where: str) -> Prompt:
    spacing = load_volume(target).spacing
    try:
        if text:  # a full template, or a modality name completed from the target's metadata
            try:
                known = prompt_from_image(target)
            except PromptError:
                known = None
            return target_prompt(text, known, spacing, None)
        if bids_modality(target) is None:
            raise PromptError(f"{target}: not a BIDS-named image, so its modality is unknown; give a 'prompt'")
        return prompt_from_bids(target)
    except PromptError as error:
        raise UserInputError(f"{where}: {error}") from None


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation of each measure per (task, method)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"]), []).append(row)
    summary = []
    for (task, method), members in groups.items():
        entry: dict[str, Any] = {"task": task, "method": method, "group": members[0]["group"], "n": len(members)}
        for key in ("psnr", "ssim", "pearson", *VOLUME_ERRORS):
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


# downstream tissue-volume errors (%, mean over CSF/GM/WM): synthesized vs real image, synthesized vs the simulator's
# truth, and the real image vs that truth (the segmentation's own error, the floor for the synthesized one)
VOLUME_ERRORS = ("volume_error_pct", "truth_volume_error_pct", "real_truth_volume_error_pct")


def volume_table(summary: Sequence[dict[str, Any]]) -> str:
    """The downstream check as Markdown (tasks with a T1w target), or an empty string when no row has it."""
    entries = [s for s in summary if "volume_error_pct_mean" in s]
    if not entries:
        return ""
    lines = ["| task | method | vs real image (%) | vs simulator truth (%) | real image vs truth (%) |",
             "|---|---|---|---|---|"]
    for s in entries:
        cells = [f"{s[f'{key}_mean']:.1f} ± {s[f'{key}_std']:.1f}" if f"{key}_mean" in s else "-"
                 for key in VOLUME_ERRORS]
        lines.append(f"| {s['task']} | {s['method']} | " + " | ".join(cells) + " |")
    return ("\n\nDownstream (paper Table 2): CSF/GM/WM volumes by a 3-class k-means inside the brain, mean absolute "
            "error in %.\n\n" + "\n".join(lines))


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    methods = list(dict.fromkeys(s["method"] for s in summary))
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    cell = {(s["task"], s["method"]): s for s in summary}
    lines = ["| task | " + " | ".join(f"{m} PSNR (dB) | {m} SSIM | {m} r" for m in methods) + " |",
             "|---|" + "---|---|---|" * len(methods)]
    for task in tasks:
        values = []
        for method in methods:
            s = cell.get((task, method))
            values += ["-", "-", "-"] if s is None else [f"{s['psnr_mean']:.2f} ± {s['psnr_std']:.2f}",
                                                         f"{s['ssim_mean']:.3f} ± {s['ssim_std']:.3f}",
                                                         f"{s['pearson_mean']:.3f} ± {s['pearson_std']:.3f}"]
        lines.append(f"| {task} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _write_figure(path: str, summary: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(s["method"] for s in summary))
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    cell = {(s["task"], s["method"]): s for s in summary}
    figure, axes = plt.subplots(1, 2, figsize=(2.4 * len(tasks) + 3, 4))
    width = 0.8 / len(methods)
    for axis, key, label in ((axes[0], "psnr", "PSNR (dB), brain"), (axes[1], "pearson", "Pearson r, brain")):
        for k, method in enumerate(methods):
            means = [cell[(t, method)][f"{key}_mean"] if (t, method) in cell else np.nan for t in tasks]
            stds = [cell[(t, method)][f"{key}_std"] if (t, method) in cell else 0 for t in tasks]
            axis.bar(np.arange(len(tasks)) + k * width, means, width, yerr=stds, label=method)
        axis.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=30, ha="right")
        axis.set_ylabel(label)
    axes[1].axhline(0, color="black", linewidth=0.5)
    axes[0].legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)


def block_averaged(image: nib.Nifti1Image, factors: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``image``'s array averaged over blocks of ``factors`` voxels per axis, and the affine of the block grid.

    The blocks average (anti-alias) rather than subsample, as a thick slice or a coarse voxel records the signal, and
    the affine keeps each block's centre, so co-registered images stay co-registered."""
    array = image.get_fdata(dtype=np.float32)
    factors = np.asarray(factors, dtype=int)
    shape = [n // f for n, f in zip(array.shape[:3], factors)]
    blocks = array[: shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]]
    blocks = blocks.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2]).mean(axis=(1, 3, 5))
    affine = image.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ ((factors - 1) / 2.0)  # the first block's centre
    affine[:3, :3] *= factors
    return blocks.astype(np.float32), affine


def _bids_images(dataset_dir: str):
    """(folder, file name) of every file of a BIDS dataset outside derivatives/."""
    for folder, _, files in os.walk(dataset_dir):
        if os.path.relpath(folder, dataset_dir).split(os.sep)[0] != "derivatives":
            yield from ((folder, name) for name in sorted(files))


def downsample_bids(dataset_dir: str, output_dir: str, factor: int) -> str:
    """A copy of a BIDS dataset with every image block-averaged by ``factor`` along each axis (sidecars copied).

    A cheap way to evaluate large real scans on a CPU. Returns ``output_dir``.
    """
    import shutil

    if int(factor) < 1:
        raise UserInputError(f"eval_downsample: expected a positive integer factor, got {factor!r}")
    for folder, name in _bids_images(dataset_dir):
        target_folder = os.path.join(output_dir, os.path.relpath(folder, dataset_dir))
        os.makedirs(target_folder, exist_ok=True)
        source, target = os.path.join(folder, name), os.path.join(target_folder, name)
        if not name.endswith((".nii", ".nii.gz")):
            shutil.copyfile(source, target)
            continue
        save_nifti(*block_averaged(nib.load(source), [int(factor)] * 3), target)
    return output_dir


def thick_slice_acq(slices: int) -> str:
    """The BIDS ``acq-`` label of the thick axial copies ``thicken_bids`` writes."""
    return f"ax{int(slices)}mm"


def thicken_bids(dataset_dir: str, output_dir: str, slices: int) -> str:
    """A copy of a BIDS dataset in which every image also has a thick-slice version: ``slices`` axial slices averaged
    into one, as a clinical 2D scan of the same patient records (``acq-ax<slices>mm``, beside the original).

    The super-resolution check on real scans: restore each thick copy to the original grid in its own contrast
    (``thick_slice_tasks``). Returns ``output_dir``."""
    import shutil

    for folder, name in _bids_images(dataset_dir):
        target_folder = os.path.join(output_dir, os.path.relpath(folder, dataset_dir))
        os.makedirs(target_folder, exist_ok=True)
        source = os.path.join(folder, name)
        shutil.copyfile(source, os.path.join(target_folder, name))
        if not name.endswith((".nii", ".nii.gz")) or name.startswith("."):
            continue
        image = nib.load(source)
        factors = [1, 1, 1]
        factors[int(nib.orientations.io_orientation(image.affine)[:, 0].tolist().index(2))] = int(slices)
        stem = name.split("_")
        thick_name = "_".join(stem[:1] + [f"acq-{thick_slice_acq(slices)}"] + stem[1:])
        save_nifti(*block_averaged(image, factors), os.path.join(target_folder, thick_name))
    return output_dir


def ensure_evaluation_dataset(dataset_dir: str, sites: Sequence[str], seed: int, voxel_mm: int = 1) -> str:
    """``dataset_dir``, simulated first (one held-out subject per site of ``sites``) when it has no participants.tsv."""
    if not os.path.isfile(os.path.join(dataset_dir, "participants.tsv")):
        simulate(dataset_dir, num_subjects=len(sites), seed=seed, sites=sites, voxel_mm=voxel_mm)
    return dataset_dir


def evaluated_dataset(dataset_dir: str, output_dir: str, downsample: int | str = 1, thicken: int | str = 0) -> str:
    """The BIDS dataset evaluate runs on: ``dataset_dir`` block-averaged by ``downsample`` (``downsample_bids``, into
    ``output_dir/downsampled_data``) unless it is 1, then given thick-slice copies (``thicken_bids``, into
    ``output_dir/thick_data``) unless ``thicken`` is 0."""
    if int(downsample) != 1:
        dataset_dir = downsample_bids(dataset_dir, os.path.join(output_dir, "downsampled_data"), downsample)
    if str(thicken) != "0":
        dataset_dir = thicken_bids(dataset_dir, os.path.join(output_dir, "thick_data"), thicken)
    return dataset_dir


def thick_slice_tasks(slices: int) -> tuple[Task, ...]:
    """Super-resolution within each real contrast: the ``thicken_bids`` copy -> the original grid."""
    return tuple(Task(f"ax{int(slices)}mm {m}->{m}", m, m, source_acq=thick_slice_acq(slices), group="real-sr")
                 for m in ("T1w", "T1CE", "T2w", "FLAIR"))


NORMALISATION_NOTE = (
    "Brain: the simulator's mask on simulated data, else the voxels where target and source are both non-zero. "
    "Intensities: each image divided by its 99th percentile inside the brain, clipped to [0, 1.5]; PSNR with data "
    "range 1.0 over the brain; SSIM 3D (Gaussian window 11) over the brain bounding box, background 0; r: Pearson "
    "correlation over the brain (the identity's r is the source's own correlation with the target). Baselines: "
    "identity = the normalised source resampled to the target grid; oracle-lut = 256 source quantile bins each "
    "mapped to the mean target of the bin, fitted on the target itself (the best voxel-wise intensity mapping).\n\n")


def _engine_note(inferer: TUMSynInferer) -> str:
    averaged = len(inferer.mirror_axes)
    return (f"Networks' input normalisation: {INPUT_NORMALISATION}; predictions averaged over {averaged} mirror "
            f"image{'s' if averaged > 1 else ''} of the input (flip_averaging).\n\n")


BASELINES = ("identity", "oracle-lut")


def baseline_table(rows: Sequence[dict[str, Any]]) -> str:
    """Each network against the two baselines, case by case (Pearson r), as Markdown; empty without the identity.

    A scan already correlates with every other contrast of its patient, inverted ones by magnitude, so a synthesis is
    worth having where it beats the input's |r|; the lookup table, fitted on the target, is the most any voxel-wise
    remapping of the input can reach."""
    by_case: dict[tuple[str, str, str], dict[str, float]] = {}
    for row in rows:
        by_case.setdefault((row["site"], row["subject"], row["task"]), {})[row["method"]] = row["pearson"]
    counts: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
    for (_, _, task), scores in by_case.items():
        if "identity" not in scores:
            continue
        for method in (m for m in scores if m not in BASELINES):
            lut = scores.get("oracle-lut")
            counts.setdefault((task, method), []).append(
                (scores[method] - abs(scores["identity"]), None if lut is None else scores[method] - lut))
    if not counts:
        return ""
    lines = ["| task | method | above the input's \\|r\\| | mean r - input \\|r\\| | mean r - oracle LUT r |",
             "|---|---|---|---|---|"]
    for (task, method), gaps in counts.items():
        above = sum(gap > 0 for gap, _ in gaps)
        to_lut = [gap for _, gap in gaps if gap is not None]
        lut_cell = f"{np.mean(to_lut):+.3f}" if to_lut else "-"
        lines.append(f"| {task} | {method} | {above} of {len(gaps)} | {np.mean([g for g, _ in gaps]):+.3f} | "
                     f"{lut_cell} |")
    return ("\n\nAgainst the baselines, case by case (Pearson r): the input's own |r| with the target (inverted "
            "contrasts count by magnitude) and the oracle lookup table's r.\n\n" + "\n".join(lines))


def run_evaluation(dataset_dir: str | None, output_dir: str, methods: Sequence[Method], inferer: TUMSynInferer,
                   tasks: Sequence[Task] | None = None, subjects: Sequence[str] | None = None,
                   datalist: str | None = None) -> list[dict[str, Any]]:
    """Evaluate every case (a BIDS dataset's tasks, or a datalist's pairs); write metrics.csv/.md/.png, summary.csv.

    ``tasks`` default to the catalogue that fits the dataset (``tasks_for``). A case refused for its images is logged
    (one line each) and left out; the metrics of the others are written, then the run ends with one error counting
    the failures.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserInputError(f"output_dir {output_dir}: a file, not a folder")
    if datalist:
        cases = load_pairs(datalist)
    elif dataset_dir:
        cases = bids_cases(dataset_dir, tasks_for(dataset_dir) if tasks is None else tasks, subjects)
    else:
        raise UserInputError("evaluate: give a BIDS dataset_dir or a datalist of (input, target) pairs")
    rows, failures = [], []
    for case in cases:
        try:
            rows += evaluate_case(case, methods, inferer)
        except (UserInputError, OSError) as error:  # one bad pair must not discard the others' scores
            message = str(error) if isinstance(error, UserInputError) else f"{case.source_path}: {one_line(error)}"
            if len(cases) > 1:  # a single case's error is the run's error, shown once
                logger.error("%s %s: %s", case.subject, case.task.name, message)
            failures.append(f"{case.subject} {case.task.name}: {message}" if len(cases) > 1 else message)
    if not rows:  # nothing scored: nothing written, the (first) failure is the run's error
        raise UserInputError(failures[0] if len(cases) == 1 else
                             f"evaluate: all {len(cases)} cases failed; first: {failures[0]}")
    os.makedirs(output_dir, exist_ok=True)
    summary = summarise(rows)
    _write_csv(os.path.join(output_dir, "metrics.csv"), rows)
    _write_csv(os.path.join(output_dir, "summary.csv"), summary)
    with atomic_path(os.path.join(output_dir, "metrics.md")) as temporary, open(temporary, "w") as handle:
        handle.write(NORMALISATION_NOTE + _engine_note(inferer) + markdown_table(summary) + baseline_table(rows)
                     + volume_table(summary) + "\n")
    _write_figure(os.path.join(output_dir, "metrics.png"), summary)
    if failures:
        raise UserInputError(f"evaluate: {len(failures)} of {len(cases)} cases failed (metrics of the other "
                             f"{len(cases) - len(failures)} written to {output_dir}); first: {failures[0]}")
    return rows
