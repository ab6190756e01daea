"""Datalist of a real BIDS dataset (IXI, OASIS, HCP, BraTS converted to BIDS) for both training stages.

Finds every anatomical image (``sub-*/[ses-*/]anat/*.nii[.gz]``), builds its prompt from its JSON sidecars (BIDS
inheritance: ``T1w.json`` at the top applies to every T1w) and participants.tsv (``scripts.prompt.prompt_from_bids``),
groups the images of each subject/session, marks the co-registered ones (same shape and affine within a tolerance,
one per modality) as the stage-2 pairs, splits train/validation/test by subject (seeded, so no subject's anatomy is
in two splits) and records every image it left out, and why. Nothing is skipped silently.

    python -m scripts.data.bids_datalist DATASET_DIR --output datalist.json [--val_fraction 0.2] [--test_fraction 0.1]
        [--seed 0] [--require RepetitionTime EchoTime]

The JSON holds paths relative to ``dataset_dir``. The stage configs read it through ``stage1_datalists`` /
``stage2_datalists`` here, which return what ``scripts.data.bids_data`` returns for a scanned folder::

    --datalists "$__import__('scripts.data.bids_datalist').bids_datalist.stage2_datalists('datalist.json')"
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import nibabel as nib
import numpy as np

from ..prompt import CONTEXT_LENGTH, MODALITIES, PromptError, bids_modality, count_tokens, prompt_from_bids
from .bids_data import (
    BidsImage,
    check_stage2_datalists,
    split_subjects,
    stage1_datalist,
    stage2_pairs,
    stage2_subjects,
    subsample_pairs,
)

# Sidecar fields without which an image is left out by default: TR and TE set the contrast the prompt describes.
DEFAULT_REQUIRED_FIELDS = ("RepetitionTime", "EchoTime")
AFFINE_TOLERANCE_MM = 1e-3  # largest difference of affine entries (mm) between co-registered images
NIFTI_PATTERNS = ("sub-*/anat/*.nii", "sub-*/anat/*.nii.gz", "sub-*/ses-*/anat/*.nii", "sub-*/ses-*/anat/*.nii.gz")


def _entity(path: str, key: str) -> str | None:
    name = os.path.basename(path).split(".")[0]
    return next((e for e in name.split("_") if e.startswith(f"{key}-")), None)


def _read_sidecar(path: str) -> dict:
    with open(path) as handle:
        sidecar = json.load(handle)
    if not isinstance(sidecar, dict):
        raise ValueError("expected a JSON object")
    return sidecar


def inherited_sidecar(path: str, root: str) -> dict:
    """The JSON metadata of a BIDS image under the inheritance principle: every ``*_<suffix>.json`` from the dataset
    root down to the image's folder whose entities are a subset of the image's, the more specific ones (deeper,
    then more entities) overriding the others. Raises ValueError naming an unreadable sidecar."""
    stem = os.path.basename(path).split(".")[0]
    entities, suffix = set(stem.split("_")[:-1]), stem.split("_")[-1]
    relative = os.path.relpath(os.path.dirname(os.path.abspath(path)), root).split(os.sep)
    folders = [os.path.join(root, *relative[:depth]) for depth in range(len(relative) + 1)]
    merged: dict = {}
    for folder in folders:
        candidates = []
        for candidate in glob.glob(os.path.join(folder, f"*{suffix}.json")):
            parts = os.path.basename(candidate)[: -len(".json")].split("_")
            if parts[-1] == suffix and set(parts[:-1]) <= entities:
                candidates.append((len(parts), candidate))
        for _, candidate in sorted(candidates):
            try:
                merged.update(_read_sidecar(candidate))
            except (OSError, ValueError) as error:
                raise ValueError(f"unreadable sidecar {os.path.relpath(candidate, root)} ({error})") from None
    return merged


# Sidecar keys -> prompt fields (and the factor to the prompt's units) that a sidecar may inherit from higher folders.
_PROMPT_FIELDS = {"MagneticFieldStrength": ("field_strength", None), "Manufacturer": ("manufacturer", None),
                  "RepetitionTime": ("tr", 1000.0), "EchoTime": ("te", 1000.0), "InversionTime": ("ti", 1000.0),
                  "FlipAngle": ("fa", None)}


def _inherited_prompt_fields(sidecar: dict, path: str) -> dict:
    """Prompt overrides for the sidecar values that ``prompt_from_bids`` (which reads the image's own sidecar only)
    would miss; times in seconds become ms. Raises ValueError for a time that is not a number."""
    own_path = path[: -len(".nii.gz")] + ".json" if path.endswith(".nii.gz") else path[: -len(".nii")] + ".json"
    own = _read_sidecar(own_path) if os.path.isfile(own_path) else {}
    overrides = {}
    for key, (field, to_prompt_units) in _PROMPT_FIELDS.items():
        if key in own or sidecar.get(key) is None:
            continue
        value = sidecar[key]
        if to_prompt_units is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"inherited sidecar field {key}: expected seconds, got {value!r}")
            value = value * to_prompt_units
        overrides[field] = value
    return overrides


def _check_image(path: str, root: str, required_fields) -> tuple[dict | None, str | None]:
    """(record, None) for a usable image, else (None, why not)."""
    modality = bids_modality(path)
    if modality is None:
        return None, f"suffix {os.path.basename(path).split('.')[0].split('_')[-1]!r} is not one of {MODALITIES}"
    try:
        header = nib.load(path)
        shape, affine = header.shape, header.affine
    except Exception as error:  # nibabel raises many types for damaged files; any of them means unreadable
        return None, f"unreadable image ({type(error).__name__}: {error})"
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        return None, f"expected a 3D image, got shape {tuple(shape)}"
    try:
        sidecar = inherited_sidecar(path, root)
        overrides = _inherited_prompt_fields(sidecar, path)
    except ValueError as error:
        return None, str(error)
    if not sidecar and required_fields:
        return None, f"no JSON sidecar, own or inherited (needs {', '.join(required_fields)})"
    missing = [f for f in required_fields if sidecar.get(f) in (None, "")]
    if missing:
        return None, f"its sidecars lack {', '.join(missing)}"
    try:
        prompt = prompt_from_bids(path, **overrides).render()
    except PromptError as error:
        return None, f"no prompt: {error}"
    if count_tokens(prompt) > CONTEXT_LENGTH:
        return None, f"prompt longer than the text encoder's {CONTEXT_LENGTH} tokens: {prompt!r}"
    record = {"image": path, "modality": modality, "prompt": prompt, "shape": [int(s) for s in shape[:3]],
              "affine": np.asarray(affine, dtype=float)}
    return record, None


def _same_grid(a: dict, b: dict, tolerance: float) -> bool:
    return a["shape"] == b["shape"] and np.allclose(a["affine"], b["affine"], rtol=0, atol=tolerance)


def _co_registered(records: list[dict], tolerance: float) -> tuple[list[dict], list[tuple[str, str]]]:
    """The largest set of ``records`` on one grid, one image per modality, and (path, reason) for the others.

    Ties between grids go to the one holding the earliest modality in MODALITIES order (T1w first), as the
    reference contrast a registration would pick."""
    grids: list[list[dict]] = []
    for record in records:
        grid = next((g for g in grids if _same_grid(g[0], record, tolerance)), None)
        if grid is None:
            grids.append([record])
        else:
            grid.append(record)
    best = max(grids, key=lambda g: (len({r["modality"] for r in g}), -min(MODALITIES.index(r["modality"]) for r in g)))
    paired, left_out, seen = [], [], set()
    for record in best:
        if record["modality"] in seen:
            left_out.append((record["image"], f"a second {record['modality']} on the shared grid (first one kept)"))
        else:
            seen.add(record["modality"])
            paired.append(record)
    for record in (r for g in grids if g is not best for r in g):
        left_out.append((record["image"], f"not on the session's shared grid {best[0]['shape']} "
                                          f"(shape {record['shape']} or affine differs by > {tolerance} mm); "
                                          "co-register it first (scripts.data.registration)"))
    return paired, left_out


def _split(subjects: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """subject -> training/validation/test, seeded; test is taken first, then validation from the rest."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction: expected a number in [0, 1), got {test_fraction!r}")
    rest, test = (subjects, []) if test_fraction == 0 else split_subjects(subjects, test_fraction, seed)
    train, val = split_subjects(rest, val_fraction / (1 - test_fraction), seed)
    return {**{s: "training" for s in train}, **{s: "validation" for s in val}, **{s: "test" for s in test}}


def build_datalist(dataset_dir: str, val_fraction: float = 0.2, test_fraction: float = 0.1, seed: int = 0,
                   required_fields=DEFAULT_REQUIRED_FIELDS, tolerance: float = AFFINE_TOLERANCE_MM) -> dict:
    """The datalist of ``dataset_dir`` (see the module docstring); paths relative to ``dataset_dir``.

    Returns ``{"dataset_dir", "training", "validation", "test", "skipped"}``: each split a list of sessions
    ``{"subject", "session", "images": [{"image", "modality", "prompt"}], "paired": [image paths]}``, and
    ``skipped`` a list of ``{"image", "reason"}`` (images left out entirely, or left out of the stage-2 pairs)."""
    if not os.path.isdir(dataset_dir):
        raise ValueError(f"dataset_dir {dataset_dir!r}: no such folder (expected a BIDS dataset with sub-*/anat/)")
    root = os.path.abspath(dataset_dir)
    paths = sorted({p for pattern in NIFTI_PATTERNS for p in glob.glob(os.path.join(root, pattern))})
    if not paths:
        raise ValueError(f"dataset_dir {dataset_dir!r}: no images found (expected sub-*/[ses-*/]anat/*.nii[.gz])")
    sessions: dict[tuple[str, str | None], list[dict]] = {}
    skipped: list[tuple[str, str]] = []
    for path in paths:
        record, reason = _check_image(path, root, required_fields)
        if record is None:
            skipped.append((path, reason))
        else:
            sessions.setdefault((_entity(path, "sub"), _entity(path, "ses")), []).append(record)
    if not sessions:
        raise ValueError(f"dataset_dir {dataset_dir!r}: every image was skipped, e.g. {skipped[0][0]}: {skipped[0][1]}")
    split_of = _split(sorted({subject for subject, _ in sessions}), val_fraction, test_fraction, seed)
    datalist = {"dataset_dir": root, "training": [], "validation": [], "test": []}
    for (subject, session), records in sorted(sessions.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        paired, left_out = _co_registered(records, tolerance)
        skipped += left_out
        datalist[split_of[subject]].append({
            "subject": subject, "session": session,
            "images": [{"image": os.path.relpath(r["image"], root), "modality": r["modality"], "prompt": r["prompt"]}
                       for r in records],
            "paired": [os.path.relpath(r["image"], root) for r in paired],
        })
    datalist["skipped"] = [{"image": os.path.relpath(p, root), "reason": r} for p, r in sorted(skipped)]
    return datalist


def write_datalist(datalist: dict, path: str) -> str:
    """Write ``datalist`` as JSON atomically (temporary file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        json.dump(datalist, handle, indent=1)
    os.replace(temporary, path)
    return path


def read_datalist(path: str, split: str) -> list[BidsImage]:
    """The images of one split of a written datalist as ``scripts.data.bids_data`` records.

    A record's ``subject`` is the subject and session (``sub-01_ses-2``), so each session's co-registered images
    pair only with each other; ``on_truth_grid`` marks the co-registered (paired) ones."""
    with open(path) as handle:
        datalist = json.load(handle)
    if split not in datalist or "dataset_dir" not in datalist:
        raise ValueError(f"{path}: expected a datalist with 'dataset_dir' and {split!r} "
                         "(from scripts.data.bids_datalist)")
    root = datalist["dataset_dir"]
    records = []
    for session in datalist[split]:
        group = "_".join(filter(None, (session["subject"], session["session"])))
        paired = set(session["paired"])
        records += [BidsImage(path=os.path.join(root, i["image"]), subject=group, modality=i["modality"],
                              prompt=i["prompt"], on_truth_grid=i["image"] in paired) for i in session["images"]]
    return records


def stage1_datalists(path: str) -> tuple[list[dict], list[dict]]:
    """(training, validation) image-prompt items of a written datalist, as ``bids_data.stage1_datalists``."""
    return stage1_datalist(read_datalist(path, "training")), stage1_datalist(read_datalist(path, "validation"))


def stage2_datalists(path: str, max_val_pairs: int | None = None, seed: int = 0,
                     tasks: list[tuple[int, int]] | None = None) -> tuple[list[dict], list[dict]]:
    """(training sessions, validation pairs) of a written datalist, as ``bids_data.stage2_datalists``."""
    train = stage2_subjects(read_datalist(path, "training"), tasks)
    val = stage2_pairs(read_datalist(path, "validation"), tasks)
    check_stage2_datalists(train, val, path, "sessions with at least 2 co-registered contrasts", tasks)
    return train, subsample_pairs(val, max_val_pairs, seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.data.bids_datalist", description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir")
    parser.add_argument("--output", required=True, help="the JSON datalist to write")
    parser.add_argument("--val_fraction", type=float, default=0.2)
    parser.add_argument("--test_fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--require", nargs="*", default=list(DEFAULT_REQUIRED_FIELDS),
                        help="sidecar fields an image must have (none: --require)")
    args = parser.parse_args(argv)
    datalist = build_datalist(args.dataset_dir, args.val_fraction, args.test_fraction, args.seed, args.require)
    write_datalist(datalist, args.output)
    counts = {split: sum(len(s["images"]) for s in datalist[split]) for split in ("training", "validation", "test")}
    print(f"{args.output}: images per split {counts}; skipped {len(datalist['skipped'])}:")
    for entry in datalist["skipped"]:
        print(f"  {entry['image']}: {entry['reason']}")


if __name__ == "__main__":
    main()
