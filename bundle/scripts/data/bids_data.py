"""BIDS dataset -> training datalists for both stages.

A dataset is scanned once into ``BidsImage`` records (path, subject, modality, prompt); subjects are split into
train/validation deterministically by seed, so no subject's anatomy is seen in both. A dataset training cannot use
(missing, empty, an image without its JSON sidecar, a prompt that does not parse or is too long) stops with one
``UserInputError`` line naming the file, before any volume is loaded. Stage 1 pairs every image with its
own prompt; stage 2 uses the images of a subject on its shared 1 mm "truth grid" (no ``acq-`` entity), every ordered
(source, target) pair of contrasts, with the target's prompt as the instruction.
"""

from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass

import torch

from ..errors import UserInputError
from ..prompt import CONTEXT_LENGTH, MODALITIES, PromptError, bids_modality, count_tokens, prompt_from_bids, tokenize


@dataclass(frozen=True)
class BidsImage:
    path: str
    subject: str
    modality: str
    prompt: str
    on_truth_grid: bool  # False for clinical low-res acquisitions (``acq-`` entity)


def _entities(path: str) -> list[str]:
    name = os.path.basename(path)
    return name[: -len(".nii.gz")].split("_") if name.endswith(".nii.gz") else os.path.splitext(name)[0].split("_")


def scan_bids(dataset_dir: str) -> list[BidsImage]:
    """Every anatomical image of ``dataset_dir`` with a known modality, sorted by path, with its rendered prompt."""
    if not os.path.isdir(dataset_dir):
        raise UserInputError(f"dataset_dir {dataset_dir!r}: no such folder (expected a BIDS dataset with sub-*/anat/)")
    paths = sorted(
        path
        for pattern in ("sub-*/anat/*.nii*", "sub-*/ses-*/anat/*.nii*")
        for path in glob.glob(os.path.join(dataset_dir, pattern))
        if bids_modality(path) is not None
    )
    if not paths:
        raise UserInputError(f"dataset_dir {dataset_dir!r}: no images found (expected sub-*/anat/sub-*_<suffix>.nii.gz "
                             f"with a suffix for one of {', '.join(MODALITIES)})")
    records = []
    for path in paths:
        sidecar = (path[: -len(".nii.gz")] if path.endswith(".nii.gz") else os.path.splitext(path)[0]) + ".json"
        if not os.path.isfile(sidecar):
            raise UserInputError(f"{path}: no JSON sidecar {os.path.basename(sidecar)} (training pairs each image with "
                                 "its acquisition metadata: RepetitionTime, EchoTime, InversionTime, FlipAngle, ...)")
        try:
            prompt = prompt_from_bids(path).render()
        except PromptError as error:
            raise UserInputError(f"{path}: cannot build its prompt: {error}") from None
        length = count_tokens(prompt)
        if length > CONTEXT_LENGTH:
            raise UserInputError(f"{path}: its prompt is {length} tokens, the text encoder reads at most "
                                 f"{CONTEXT_LENGTH}: {prompt!r}")
        entities = _entities(path)
        records.append(BidsImage(path=path, subject=entities[0], modality=bids_modality(path), prompt=prompt,
                                 on_truth_grid=not any(e.startswith("acq-") for e in entities)))
    return records


def split_subjects(subjects, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, validation) subject lists: a seeded shuffle of the sorted unique subjects, at least one of each."""
    unique = sorted(set(subjects))
    if len(unique) < 2:
        raise UserInputError(f"subject split: expected at least 2 subjects (one for validation), got {len(unique)}")
    if not 0 < val_fraction < 1:
        raise UserInputError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    random.Random(seed).shuffle(unique)
    n_val = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    return sorted(unique[n_val:]), sorted(unique[:n_val])


def stage1_datalist(images: list[BidsImage]) -> list[dict]:
    """One item per image: its path, prompt, prompt tokens ``[90]`` and modality index."""
    tokens = tokenize([image.prompt for image in images]) if images else []
    return [
        {"image": image.path, "prompt": image.prompt, "tokens": tokens[i], "subject": image.subject,
         "modality": MODALITIES.index(image.modality)}
        for i, image in enumerate(images)
    ]


def _truth_grid_contrasts(images: list[BidsImage]) -> dict[str, list[BidsImage]]:
    """Per subject, its truth-grid images, one per modality (sorted by modality order)."""
    by_subject: dict[str, dict[str, BidsImage]] = {}
    for image in images:
        if image.on_truth_grid:
            by_subject.setdefault(image.subject, {}).setdefault(image.modality, image)
    return {s: sorted(c.values(), key=lambda i: MODALITIES.index(i.modality)) for s, c in sorted(by_subject.items())}


def parse_tasks(tasks, key: str = "train_tasks") -> list[tuple[int, int]] | None:
    """``['T2w->FLAIR', ...]`` as (source, target) modality-index pairs; None (every ordered pair) stays None.

    A task-specific model trains on, and is validated on, these pairs only.
    """
    if tasks is None:
        return None
    expected = f"expected 'source->target' of two distinct modalities among {', '.join(MODALITIES)}"
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise UserInputError(f"{key}: {expected} (a list, e.g. ['T2w->FLAIR'], or null), got {tasks!r}")
    pairs = []
    for task in tasks:
        names = [name.strip() for name in str(task).split("->")]
        if len(names) != 2 or names[0] == names[1] or any(name not in MODALITIES for name in names):
            raise UserInputError(f"{key}: {expected}, got {task!r}")
        pairs.append((MODALITIES.index(names[0]), MODALITIES.index(names[1])))
    return pairs


def _allowed(source: BidsImage, target: BidsImage, tasks: list[tuple[int, int]] | None) -> bool:
    return source is not target and (
        tasks is None or (MODALITIES.index(source.modality), MODALITIES.index(target.modality)) in tasks)


def stage2_pairs(images: list[BidsImage], tasks: list[tuple[int, int]] | None = None) -> list[dict]:
    """Every ordered (source, target) pair of distinct truth-grid contrasts of each subject (only those of ``tasks``,
    modality-index pairs from ``parse_tasks``, unless None); the target's prompt."""
    pairs = []
    for subject, contrasts in _truth_grid_contrasts(images).items():
        tokens = tokenize([c.prompt for c in contrasts])
        for s, source in enumerate(contrasts):
            for t, target in enumerate(contrasts):
                if _allowed(source, target, tasks):
                    pairs.append({"source": source.path, "target": target.path, "prompt": target.prompt,
                                  "tokens": tokens[t], "modality": MODALITIES.index(target.modality),
                                  "input_modality": MODALITIES.index(source.modality), "subject": subject})
    return pairs


def stage2_subjects(images: list[BidsImage], tasks: list[tuple[int, int]] | None = None) -> list[dict]:
    """One item per subject with >= 2 truth-grid contrasts (with ``tasks``: with a pair of one of them): its images
    (loaded as one channel stack), their prompts.

    Training caches each subject's volumes once and draws a random ordered pair per patch, which covers the same
    pairs as ``stage2_pairs`` without holding a volume once per pair in memory.
    """
    return [
        {"images": [c.path for c in contrasts], "prompts": [c.prompt for c in contrasts],
         "tokens": tokenize([c.prompt for c in contrasts]),
         "modalities": torch.tensor([MODALITIES.index(c.modality) for c in contrasts]), "subject": subject}
        for subject, contrasts in _truth_grid_contrasts(images).items()
        if any(_allowed(source, target, tasks) for source in contrasts for target in contrasts)
    ]


def _split_images(dataset_dir: str, val_fraction: float, seed: int) -> tuple[list[BidsImage], list[BidsImage]]:
    images = scan_bids(dataset_dir)
    _, val_subjects = split_subjects([i.subject for i in images], val_fraction, seed)
    return [i for i in images if i.subject not in val_subjects], [i for i in images if i.subject in val_subjects]


def stage1_datalists(dataset_dir: str, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, validation) image-prompt datalists of a BIDS dataset, split by subject."""
    train, val = _split_images(dataset_dir, val_fraction, seed)
    return stage1_datalist(train), stage1_datalist(val)


def stage2_datalists(dataset_dir: str, val_fraction: float = 0.2, seed: int = 0, max_val_pairs: int | None = None,
                     tasks: list[tuple[int, int]] | None = None) -> tuple[list[dict], list[dict]]:
    """(train subjects, validation pairs) for stage 2, split by subject; both must be non-empty.

    ``max_val_pairs`` keeps a seeded random subset of the held-out pairs (in their original order): validation
    synthesizes whole volumes, so a few pairs across subjects and contrasts keep it affordable. ``tasks``
    (``parse_tasks``) keeps only those (source, target) pairs, and the subjects that have one.
    """
    train, val = _split_images(dataset_dir, val_fraction, seed)
    train_subjects, val_pairs = stage2_subjects(train, tasks), stage2_pairs(val, tasks)
    check_stage2_datalists(train_subjects, val_pairs, f"dataset_dir {dataset_dir!r}",
                           "subjects with at least 2 contrasts on the truth grid (images without acq-)", tasks)
    return train_subjects, subsample_pairs(val_pairs, max_val_pairs, seed)


def check_stage2_datalists(train_subjects: list[dict], val_pairs: list[dict], where: str, units: str,
                           tasks: list[tuple[int, int]] | None = None) -> None:
    """One line naming ``where`` and what was expected when the training subjects or validation pairs are empty."""
    if train_subjects and val_pairs:
        return
    if tasks is not None:
        units += " including both images of a train_tasks pair (" + ", ".join(
            f"{MODALITIES[s]}->{MODALITIES[t]}" for s, t in tasks) + ")"
    raise UserInputError(f"{where}: stage 2 needs {units} in both the training and the validation split")


def subsample_pairs(pairs: list[dict], max_pairs: int | None, seed: int) -> list[dict]:
    """A seeded random subset of at most ``max_pairs`` pairs, in their original order (None keeps them all)."""
    if max_pairs is None:
        return pairs
    if int(max_pairs) < 1:
        raise UserInputError(f"max_val_pairs: expected a positive number of pairs or None, got {max_pairs!r}")
    if len(pairs) <= max_pairs:
        return pairs
    kept = sorted(random.Random(seed).sample(range(len(pairs)), int(max_pairs)))
    return [pairs[i] for i in kept]


def ensure_dataset(dataset_dir: str, simulate_if_missing: bool, num_subjects: int, seed: int,
                   realism: bool | float = False) -> str:
    """``dataset_dir``, simulated first when it is missing and is the embedded default.

    Under DDP only rank 0 simulates, the others wait at a barrier. A missing user-given folder is an error rather than
    silently filled with simulated data. ``realism``: the share of simulated subjects with the real-scan effects of
    ``scripts.simulator.realism``.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not os.path.isdir(dataset_dir):
        if not simulate_if_missing:
            raise UserInputError(f"dataset_dir {dataset_dir!r}: no such folder (expected a BIDS dataset)")
        if not distributed or torch.distributed.get_rank() == 0:
            from ..simulator import simulate

            simulate(dataset_dir, num_subjects, seed, realism=realism)
    if distributed:
        torch.distributed.barrier()
    return dataset_dir
