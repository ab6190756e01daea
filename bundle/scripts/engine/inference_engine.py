"""Whole-volume inference: any scan + a target prompt -> the requested contrast at the requested voxel size.

The engine (windows, latent slab, decoding) and its MONAI ``Inferer`` are ``scripts.engine.synthesis_engine``.

Geometry (``output_grid``): the output tiles the input's field of view at the target voxel size (rounded so the
FOV edges coincide), keeps the input's orientation and direction cosines (oblique stays oblique), and the network
sees every input in the closest RAS+ voxel order, as it saw its training data.

Driver (``run_inference``, ``run_batch``, ``SynthesisRunner`` for ``configs/inference.yaml``): loads and checks the
input, resolves the prompts, writes ``<stem>_<modality>.nii.gz``, a PNG preview and a JSON sidecar, all three to
temporary names first and renamed with the sidecar last, so a sidecar marks a finished case. A batch row's outputs
keep the input's folder relative to the datalist and its explicit target spacing in their names
(``siteA/sub-01_T1w_FLAIR_2x2x2mm.nii.gz``), and its sidecar records the row (input content hash, prompt, spacing):
a rerun skips a row only when that record matches.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import math
import os
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch

import scripts

from ..data.intensity import normalize_intensity
from ..errors import UserInputError, check_bundle_run, config_null, one_line, quoted
from ..prompt import MODALITIES, Prompt, PromptError, canonical_modality, prompt_from_image, tokenize
from .ood import ood_warnings
from .preview import save_preview
from .synthesis_engine import TUMSynInferer, foreground_mask
from .volume_io import Volume, atomic_paths, check_memory, load_volume, remove_stale_temporaries, write_nifti_file

logger = logging.getLogger(__name__)

# Bytes per output voxel held at once: the float32 prediction, its resampled mask and a copy on write.
OUTPUT_BYTES_PER_VOXEL = 12
# averaging several predictions (flip_averaging) holds two more: the running sum and the next
# prediction (or its flipped copy)
AVERAGING_BYTES_PER_VOXEL = 8

NIFTI_EXTENSIONS = (".nii.gz", ".nii")


# ---------------------------------------------------------------------------------------------------------------
# Geometry


def output_grid(shape: Sequence[int], affine: np.ndarray, target_spacing: Sequence[float]
                ) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the grid tiling the input's field of view at about ``target_spacing`` (file axis order).

    The voxel count per axis is the FOV divided by the target size, rounded; the voxel size is then adjusted so
    the grid covers exactly the input FOV (its outer edges coincide) with the input's direction cosines.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    extent = np.asarray(shape, dtype=np.float64) * spacing
    out_shape = np.maximum(1, np.round(extent / np.asarray(target_spacing, dtype=np.float64))).astype(int)
    out_spacing = extent / out_shape
    directions = affine[:3, :3] / spacing
    out_affine = np.eye(4)
    out_affine[:3, :3] = directions * out_spacing
    # Voxel index -0.5 is the FOV edge in both grids: origin_out - d*s_out/2 = origin_in - d*s_in/2.
    out_affine[:3, 3] = affine[:3, 3] + directions @ ((out_spacing - spacing) / 2)
    return tuple(int(n) for n in out_shape), out_affine


def _canonical_orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation (per file axis: RAS axis and sign) taking the file's voxel order to the closest RAS+."""
    return nib.orientations.io_orientation(affine)


def _reordered(values: Sequence, orientation: np.ndarray) -> tuple:
    """Per-axis ``values`` of the file's voxel order (a shape, voxel sizes) in the canonical order."""
    reordered = [None] * 3
    for axis, (target_axis, _) in enumerate(orientation):
        reordered[int(target_axis)] = values[axis]
    return tuple(reordered)


def _from_canonical(array: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    ras = nib.orientations.axcodes2ornt("RAS")
    return nib.orientations.apply_orientation(array, nib.orientations.ornt_transform(ras, orientation))


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def _checked_spacing(value: Any, what: str) -> tuple[float, float, float]:
    def is_size(v: Any) -> bool:
        return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    values = [value] * 3 if isinstance(value, (int, float, np.number)) else value
    if not (isinstance(values, (list, tuple, np.ndarray)) and len(values) == 3 and all(map(is_size, values))):
        raise UserInputError(f"{what}: expected 3 positive voxel sizes in mm (x, y, z), got {value!r}")
    return tuple(float(v) for v in values)


def source_prompt(volume: Volume) -> Prompt | None:
    """What the input's own metadata (BIDS sidecar + participants.tsv, DICOM header) says about it, if readable."""
    try:
        return prompt_from_image(volume.path, voxel_size=volume.spacing)
    except PromptError as error:
        # the prompt layer names `tumsyn prompt`'s flag; inference takes the input's contrast as --input_modality
        volume.warnings.append(f"no source prompt: {str(error).replace('(--modality)', '(--input_modality)')}")
        return None


def target_prompt(text: str, source: Prompt | None, input_spacing: Sequence[float],
                  target_spacing: Sequence[float] | None) -> Prompt:
    """The prompt the network is given.

    ``text`` is either the official template, or a modality name optionally followed by template fields
    (``"FLAIR"``, ``"FLAIR; Age: 70"``): age, sex and scanner then come from the input's metadata (``source``),
    and the voxel size from ``target_spacing`` or the input's. An explicit ``target_spacing`` always sets the
    voxel size.
    """
    try:
        prompt = Prompt.parse(text)
    except PromptError as template_error:
        head, _, fields = str(text).partition(";")
        try:
            modality = canonical_modality(head.strip())
        except PromptError as modality_error:
            bare_word = head.strip() and ":" not in head and " " not in head.strip()
            raise (modality_error if bare_word else template_error) from None  # a bare word meant a modality
        given = Prompt.parse(f"Modality: {modality}; {fields}") if fields.strip() else Prompt(modality=modality)
        inherited = {} if source is None else {
            "age": source.age, "sex": source.sex, "field_strength": source.field_strength,
            "manufacturer": source.manufacturer}
        explicit = {k: v for k, v in vars(given).items() if v is not None}
        prompt = Prompt(**{**inherited, **explicit})
    if target_spacing is not None:
        return prompt.replace(voxel_size=tuple(target_spacing))
    if prompt.voxel_size is None:
        return prompt.replace(voxel_size=tuple(input_spacing))
    return prompt


# ---------------------------------------------------------------------------------------------------------------
# One case


def _stem(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    for extension in NIFTI_EXTENSIONS:
        if name.endswith(extension):
            return name[: -len(extension)]
    return name


def output_paths(input_image: str, modality: str, output_dir: str, subfolder: str = "",
                 suffix: str = "") -> dict[str, str]:
    """Where a case's files go: ``<output_dir>/[<subfolder>/]<input stem>_<modality>[<suffix>].{nii.gz,png,json}``
    (a batch row's ``subfolder`` and ``suffix``: ``batch_output_name``)."""
    base = os.path.join(output_dir, subfolder, f"{_stem(input_image)}_{modality}{suffix}")
    return {"image": base + ".nii.gz", "preview": base + ".png", "sidecar": base + ".json"}


def spacing_tag(target_spacing: Any) -> str:
    """``_2x2x2mm`` for an explicit target spacing of a batch row ("" for none or an invalid one, which the row's run
    then refuses)."""
    if target_spacing is None or target_spacing == "":
        return ""
    try:
        spacing = _checked_spacing(target_spacing, "target_spacing")
    except UserInputError:
        return ""
    return "_" + "x".join(f"{size:g}" for size in spacing) + "mm"


def batch_output_name(input_image: str, datalist_folder: str, target_spacing: Any) -> dict[str, str]:
    """A datalist row's ``output_subfolder`` (the input's folder relative to the datalist's, so two patients' files
    of the same name stay apart) and ``output_suffix`` (its explicit target spacing, so one image asked at two
    spacings gives two files)."""
    relative = os.path.relpath(os.path.abspath(input_image), datalist_folder)
    inside = not relative.startswith(os.pardir + os.sep) and relative != os.pardir
    return {"output_subfolder": os.path.dirname(relative) if inside else "",
            "output_suffix": spacing_tag(target_spacing)}


def content_hash(path: str) -> str:
    """SHA-256 of a file's bytes, or of a DICOM folder's files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    files = [path] if not os.path.isdir(path) else sorted(
        os.path.join(path, name) for name in os.listdir(path) if os.path.isfile(os.path.join(path, name)))
    for name in files:
        digest.update(os.path.basename(name).encode() if name != path else b"")
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def case_record(input_image: str, prompt: Any, target_spacing: Any = None, input_modality: Any = None,
                volume_index: Any = None) -> dict[str, Any]:
    """What makes a case's output what it is: the input's content, the prompt and the row's settings. A sidecar
    records it; a rerun skips a case only when the record matches (a name alone could be another row's output)."""
    try:
        digest = content_hash(str(input_image))
    except OSError:
        digest = None  # the run itself reports the unreadable input
    record = {"input_sha256": digest, "prompt": prompt, "target_spacing": target_spacing,
              "input_modality": input_modality, "volume_index": volume_index}
    return json.loads(json.dumps(record, default=str))  # as it reads back from the sidecar (lists, not tuples)


def is_finished(paths: dict[str, str], record: dict[str, Any] | None = None) -> bool:
    """A case is done when its sidecar (renamed last) parses, names an image of the recorded size and its preview,
    and (given ``record``) was written for exactly that case; an image without its sidecar is unfinished."""
    try:
        with open(paths["sidecar"]) as handle:
            written = json.load(handle)
        if written.get("preview") and not os.path.isfile(paths["preview"]):
            return False
        if record is not None and written.get("case") != record:
            return False
        return os.path.getsize(paths["image"]) == written["output_bytes"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def bundle_version() -> str | None:
    """The bundle's version from ``configs/metadata.json`` (the model's version in the sidecar)."""
    try:
        with open(os.path.join(scripts.BUNDLE_ROOT, "configs", "metadata.json")) as handle:
            return json.load(handle).get("version")
    except (OSError, ValueError):
        return None


def _refuse_overwriting_inputs(paths: dict[str, str], protected: Sequence[str | None]) -> None:
    protected_real = {os.path.realpath(p) for p in protected if p}
    for path in paths.values():
        if os.path.realpath(path) in protected_real:
            raise UserInputError(f"{path}: the output would overwrite an input file; choose another output_dir")


def _check_output_dir(output_dir: str) -> None:
    """Refuse an output folder that cannot be made or written before any work is done."""
    if not output_dir:
        raise UserInputError("output_dir: expected a folder to write to, got an empty path")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):  # the nearest existing folder is where it will be created
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserInputError(f"output_dir {output_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"output_dir {output_dir}: no permission to write in {existing}")


# How the input is normalised (scripts.data.intensity.METHODS; fixed, not a user option): the white-matter peak, a
# tissue landmark that a real scan's bright tail (vessels, fat, enhancement) does not move; the shipped weights were
# trained with it (configs/stage2_train.yaml's intensity_normalisation).
INPUT_NORMALISATION = "wm_peak"
# The sidecar's statement of the output's intensity scale.
INTENSITY_NOTE = "normalised (white-matter peak of the input = 0.8), float32"


def synthesize_image(volume: Volume, target: Prompt, network: torch.nn.Module, inferer: TUMSynInferer,
                     spacing: Sequence[float] | None = None,
                     source_modality: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The synthesized image (float32, the input's voxel order) and its affine on the grid tiling the input's FOV at
    ``spacing`` (default: the target prompt's voxel size); the background (the input's zeros) stays 0.
    ``source_modality``: the input's contrast, which the network is told (None: unknown)."""
    spacing = target.voxel_size if spacing is None else spacing
    out_shape, out_affine = output_grid(volume.array.shape, volume.affine, spacing)
    per_voxel = OUTPUT_BYTES_PER_VOXEL + (AVERAGING_BYTES_PER_VOXEL if len(inferer.mirror_axes) > 1 else 0)
    check_memory(per_voxel * float(np.prod(out_shape)), f"output grid {out_shape} for {volume.path}")
    orientation = _canonical_orientation(volume.affine)
    canonical = nib.orientations.apply_orientation(volume.array, orientation)
    normalised = normalize_intensity(canonical, method=INPUT_NORMALISATION)
    image = torch.from_numpy(np.ascontiguousarray(normalised))[None]
    logger.info("%s -> %s grid %s", volume.path, target.render(), out_shape)
    prediction = inferer(image[None], network, prompt=target, out_shape=_reordered(out_shape, orientation),
                         source_modality=source_modality)[0, 0]
    # Background stays background: zero where the input's non-zero mask, resampled to the output grid, is off.
    prediction = (prediction.clamp_(min=0) * foreground_mask(image, prediction.shape)).numpy()
    return np.ascontiguousarray(_from_canonical(prediction, orientation), dtype=np.float32), out_affine


def _input_modality(name: str | None) -> str | None:
    """``input_modality`` as a canonical modality (None when not given), or one error line naming the key."""
    if config_null(name) is None or not str(name).strip():
        return None
    try:
        return canonical_modality(str(name))
    except PromptError:
        raise UserInputError(f"input_modality: expected one of {', '.join(MODALITIES)} (or an alias such as "
                             f"'T1Gd'), got {str(name)[:40]!r}") from None


def run_inference(input_image: str, prompt: str, output_dir: str, network: torch.nn.Module,
                  target_spacing: Sequence[float] | float | None = None, reference: str | None = None, *,
                  inferer: TUMSynInferer | None = None, volume_index: int | None = None,
                  nan_policy: str = "refuse", preview: bool = True,
                  input_modality: str | None = None, output_subfolder: str = "", output_suffix: str = "",
                  record: dict[str, Any] | None = None) -> dict[str, str]:
    """Synthesise one case and write its image, preview and sidecar; returns their paths.

    ``input_modality``: the input's contrast, for inputs whose metadata (BIDS name or sidecar, DICOM header) does not
    say it, or says it wrong; the network is told it (unknown otherwise).
    ``output_subfolder`` / ``output_suffix``: a batch row's place in ``output_dir`` (``batch_output_name``);
    ``record``: its ``case_record`` (computed here when not given), kept in the sidecar.
    Everything that can be wrong with the input (file, prompt, spacing, memory) is checked before anything is
    written, so a refused case leaves no file behind; a failed write (a full disk) leaves none either.
    """
    inferer = inferer or TUMSynInferer()
    if not isinstance(prompt, str):
        raise UserInputError(f"prompt: expected text (the official template or a modality such as 'FLAIR'), got "
                             f"{type(prompt).__name__} {prompt!r}")
    _check_output_dir(str(output_dir))
    spacing = None if target_spacing is None else _checked_spacing(target_spacing, "target_spacing")
    volume = load_volume(str(input_image), volume_index=volume_index, nan_policy=nan_policy)
    reference_volume = None if reference is None else load_volume(str(reference))
    source = source_prompt(volume)
    source_modality = _input_modality(input_modality) or (None if source is None else source.modality)
    target = target_prompt(prompt, source, volume.spacing, spacing)
    tokenize(target.render())  # checks the token limit before any work
    paths = output_paths(input_image, target.modality, output_dir, output_subfolder, output_suffix)
    _refuse_overwriting_inputs(paths, [str(input_image), reference])
    record = record or case_record(input_image, prompt, target_spacing, input_modality, volume_index)
    # warnings, not refusals (scripts/engine/ood.py)
    out_of_distribution = ood_warnings(volume, target, source_modality)

    # The grid follows the requested numbers, not the prompt's rounding of them (which may round tiny sizes to 0).
    grid_spacing = spacing if spacing is not None else _checked_spacing(target.voxel_size, "prompt 'Voxel size'")
    if source_modality is None:
        volume.warnings.append("the input's contrast is unknown (no BIDS name, sidecar or DICOM header gives it), so "
                               "the network infers it from the image alone; --input_modality sets it")
        logger.warning("%s: %s", input_image, volume.warnings[-1])
    synthesized, out_affine = synthesize_image(volume, target, network, inferer, grid_spacing, source_modality)
    sidecar = {
        "input_image": os.path.abspath(str(input_image)),
        "output_image": os.path.basename(paths["image"]),
        "output_bytes": None,  # the written image's size, below
        "preview": os.path.basename(paths["preview"]) if preview else None,
        "prompt_given": prompt,
        "target_prompt": target.render(),
        "source_prompt": None if source is None else source.render(),
        "input_modality": source_modality,
        "input_spacing": list(volume.spacing),
        "target_spacing": list(target.voxel_size),
        "output_spacing": [float(s) for s in np.linalg.norm(out_affine[:3, :3], axis=0)],
        "output_shape": list(synthesized.shape),
        "reference": None if reference is None else os.path.abspath(reference),
        "model_version": bundle_version(),
        "intensity": INTENSITY_NOTE,
        "mirror_images_averaged": len(inferer.mirror_axes),
        "warnings": volume.warnings,
        "ood_warnings": out_of_distribution,
        "case": record,
    }

    def write_preview(path: str) -> None:
        save_preview(path, volume, synthesized, out_affine, reference_volume)

    _write_case(paths, synthesized, out_affine, sidecar, write_preview if preview else None)
    return paths


def _write_case(paths: dict[str, str], image: np.ndarray, affine: np.ndarray, sidecar: dict[str, Any],
                write_preview) -> None:
    """Image, preview and sidecar to temporary names, then renamed in that order: the sidecar, last, marks the case
    finished, so a kill or a full disk never leaves an image that looks done. A failed write is one line naming the
    file (the OS's message for a full disk names none)."""
    remove_stale_temporaries(os.path.dirname(os.path.abspath(paths["image"])))  # a killed run's leftovers
    targets = [paths["image"]] + ([paths["preview"]] if write_preview else []) + [paths["sidecar"]]
    try:
        with atomic_paths(targets) as temporaries:
            write_nifti_file(image, affine, temporaries[0])
            if write_preview:
                write_preview(temporaries[1])
            sidecar["output_bytes"] = os.path.getsize(temporaries[0])
            with open(temporaries[-1], "w") as handle:
                json.dump(sidecar, handle, indent=2)
            # the old sidecar must not vouch for the new image while the files are renamed one by one
            if os.path.lexists(paths["sidecar"]):
                os.remove(paths["sidecar"])
    except OSError as error:
        raise UserInputError(f"{paths['image']}: could not write this case's files ({one_line(error)}); nothing was "
                             f"left under their final names") from None


# ---------------------------------------------------------------------------------------------------------------
# Many cases


CASE_KEYS = ("input_image", "prompt", "target_spacing", "reference", "input_modality")


def read_datalist_rows(path: str) -> list:
    """The rows of a CSV datalist (header line) or a JSON list / ``{"data": [...]}``, unchecked."""
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: no such datalist file")
    try:  # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name (csv reads CRLF)
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle)) if path.endswith(".csv") else json.load(handle)
    except (ValueError, csv.Error) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserInputError(f"{path}: unreadable datalist ({one_line(error)})") from None
    rows = rows.get("data") if isinstance(rows, dict) else rows
    if not isinstance(rows, list):
        raise UserInputError(f"{path}: expected a list of cases (a JSON list or a CSV with a header line)")
    return rows


def load_datalist(path: str) -> list[dict[str, Any]]:
    """Cases from a CSV (header with input_image, prompt[, target_spacing, reference]) or JSON list/``{"data": [...]}``.

    Relative image paths are taken relative to the datalist's folder.
    """
    rows = read_datalist_rows(path)
    for number, row in enumerate(rows, start=1):
        if path.endswith(".csv") and isinstance(row, dict) and row.get("target_spacing"):
            try:
                row["target_spacing"] = json.loads(row["target_spacing"])
            except ValueError as error:
                raise UserInputError(f"{path}: case {number}: unreadable target_spacing "
                                     f"{quoted(row['target_spacing'])} ({one_line(error)})") from None
    if not rows:
        raise UserInputError(f"{path}: expected a non-empty list of cases with input_image and prompt")
    folder = os.path.dirname(os.path.abspath(path))
    cases = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("input_image") or not row.get("prompt"):
            raise UserInputError(f"{path}: case {number} needs 'input_image' and 'prompt', got {quoted(row)}")
        unknown = set(row) - set(CASE_KEYS)
        if unknown:
            raise UserInputError(f"{path}: case {number} has unknown keys {sorted(unknown)}; expected "
                                 f"{list(CASE_KEYS)}")
        case = {key: row.get(key) or None for key in CASE_KEYS}
        for key in ("input_image", "reference"):
            if case[key]:
                case[key] = os.path.join(folder, case[key])
        case.update(batch_output_name(case["input_image"], folder, case["target_spacing"]))
        cases.append(case)
    return cases


# The embedded default case is a subject simulated with a seed no training run uses (held out).
DEFAULT_SEED = 1000


def default_input_image(dataset_dir: str) -> str:
    """The embedded default: a held-out simulated subject's 1 mm T1w, simulating it on first use."""
    def candidates():
        return sorted(f for f in _glob_bids(dataset_dir, "T1w") if "_acq-" not in f and "_ce-" not in f)

    if not candidates():
        from scripts.simulator import simulate

        logger.info("simulating the default subject in %s (first use)", dataset_dir)
        simulate(dataset_dir, num_subjects=1, seed=DEFAULT_SEED)
    found = candidates()
    if not found:
        raise UserInputError(f"{dataset_dir}: no sub-*/anat/sub-*_T1w.nii.gz image to use as the default input")
    return found[0]


def _glob_bids(root: str, suffix: str) -> list[str]:
    return glob.glob(os.path.join(root, "sub-*", "anat", f"sub-*_{suffix}.nii.gz"))


def inference_cases(input_image: str | None, prompt: str, target_spacing: Any, reference: str | None,
                    datalist: str | None, dataset_dir: str, input_modality: str | None = None) -> list[dict[str, Any]]:
    """The cases one config run handles: a datalist's rows, else the one given input (or the embedded default)."""
    if datalist:
        return load_datalist(datalist)
    if input_image is None and prompt is None:
        # The embedded default: synthesize the simulated subject's T2w from its T1w, with the T2w's own prompt, and
        # show the real T2w beside it (reference), so the preview measures the model at a glance.
        image = default_input_image(dataset_dir)
        truth = image.replace("_T1w.nii.gz", "_T2w.nii.gz")
        if os.path.isfile(truth):
            return [{"input_image": image, "prompt": prompt_from_image(truth).render(),
                     "target_spacing": target_spacing, "reference": reference or truth}]
    if prompt is None:
        raise UserInputError("prompt: expected the official template or a target modality (--prompt), got none")
    image = input_image or default_input_image(dataset_dir)
    return [{"input_image": image, "prompt": prompt, "target_spacing": target_spacing, "reference": reference,
             "input_modality": input_modality}]


def _case_paths(case: dict[str, Any], output_dir: str) -> dict[str, str] | None:
    """A case's output paths from its prompt alone (None when the prompt does not name a modality)."""
    modality = _target_modality(case["prompt"])
    if not modality or not case.get("input_image"):
        return None
    return output_paths(str(case["input_image"]), modality, output_dir, case.get("output_subfolder") or "",
                        case.get("output_suffix") or "")


def _refuse_shared_outputs(cases: Sequence[dict[str, Any]], output_dir: str) -> None:
    """Two cases that would write one file are refused before any work: one would overwrite, or be taken for, the
    other."""
    first_case: dict[str, int] = {}
    for number, case in enumerate(cases, start=1):
        paths = _case_paths(case, output_dir)
        if paths is None:
            continue
        key = os.path.normcase(os.path.abspath(paths["image"]))
        if key in first_case:
            raise UserInputError(f"cases {first_case[key]} and {number} would both write {paths['image']} (same "
                                 f"input file name and folder, target modality and target_spacing); give one a "
                                 f"target_spacing or move its input")
        first_case[key] = number


def run_batch(cases: Sequence[dict[str, Any]], output_dir: str, network: torch.nn.Module, *, overwrite: bool = False,
              **options: Any) -> list[dict[str, str]]:
    """``run_inference`` per case, skipping finished ones unless ``overwrite``: those whose sidecar records this
    very case (``case_record``: the input's content, prompt, spacing), never a name alone.

    Cases that would write one file are refused up front. A case refused for its input (or a failed write) does not
    stop the others; the run then ends with one error naming how many failed and why. Any other exception is a bug
    and stops the run.
    """
    _refuse_shared_outputs(cases, output_dir)
    for folder in {os.path.dirname(os.path.abspath(p["image"])) for p in filter(None, (_case_paths(c, output_dir)
                                                                                       for c in cases))}:
        remove_stale_temporaries(folder)  # a killed run's leftovers, even where every case is finished
    done, failures = [], []
    for case in cases:
        try:
            record = case_record(case["input_image"], case["prompt"], case.get("target_spacing"),
                                 case.get("input_modality"), options.get("volume_index"))
            paths = _case_paths(case, output_dir)
            if not overwrite and paths is not None and is_finished(paths, record):
                logger.info("skipping %s: already finished (%s)", case["input_image"], paths["sidecar"])
                done.append(paths)
                continue
            paths = run_inference(case["input_image"], case["prompt"], output_dir, network,
                                  case.get("target_spacing"), case.get("reference"),
                                  input_modality=case.get("input_modality"),
                                  output_subfolder=case.get("output_subfolder") or "",
                                  output_suffix=case.get("output_suffix") or "", record=record, **options)
            logger.info("wrote %s", paths["image"])
            done.append(paths)
        except (UserInputError, OSError) as error:
            if len(cases) > 1:  # a single case's error is the run's error, shown once
                logger.error("%s", error)
            failures.append(str(error) if isinstance(error, UserInputError) else one_line(error))
    if len(cases) == 1 and failures:
        raise UserInputError(failures[0])
    if failures:
        raise UserInputError(f"{len(failures)} of {len(cases)} cases failed; first: {failures[0]}")
    return done


def _target_modality(prompt: str) -> str | None:
    """The modality a prompt asks for without reading the image (None when it cannot tell)."""
    try:
        return Prompt.parse(prompt).modality
    except PromptError:
        try:
            return canonical_modality(str(prompt).partition(";")[0].strip())
        except PromptError:
            return None


def load_network_weights(network: torch.nn.Module, ckpt_path: str) -> torch.nn.Module:
    """Load a state dict safely (``weights_only``); a missing, corrupt or mismatched file is a one-line error."""
    # configs/inference.yaml runs this first, before any item that reads the prompt or the other text fields
    check_bundle_run()
    if not os.path.isfile(ckpt_path):
        raise UserInputError(f"{ckpt_path}: no such weights file (train one, or pass --ckpt_path)")
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt zip, pickled code refused by weights_only, ...
        raise UserInputError(f"{ckpt_path}: not a loadable weights file ({one_line(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__ if not isinstance(state, dict) else "a dict holding non-tensor values"
        raise UserInputError(f"{ckpt_path}: expected a state dict (parameter name -> tensor), got {kind}")
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    resized = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or resized:
        def few(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "") if keys else "none"

        raise UserInputError(f"{ckpt_path}: weights do not fit this network config (are --scale and "
                             f"--network_def#input_skip right?): "
                             f"missing {few(missing)}; unexpected {few(unexpected)}; different shape {few(resized)}")
    broken = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if broken:
        raise UserInputError(f"{ckpt_path}: NaN/Inf values in {len(broken)} tensors (first: {broken[0]}); the file "
                             f"is damaged or training diverged")
    network.load_state_dict(state)
    return network.eval()


class SynthesisRunner:
    """The ``evaluator`` of ``configs/inference.yaml``: ``run()`` synthesises every case of ``dataset``."""

    def __init__(self, network: torch.nn.Module, inferer: TUMSynInferer, dataset: Sequence[dict[str, Any]],
                 output_dir: str, overwrite: bool = True, volume_index: int | None = None,
                 nan_policy: str = "refuse", preview: bool = True):
        self.network, self.inferer, self.dataset, self.output_dir = network, inferer, dataset, output_dir
        self.overwrite = overwrite
        self.options = dict(volume_index=volume_index, nan_policy=nan_policy, preview=preview)

    def run(self) -> list[dict[str, str]]:
        # run_batch logs each case as written or skipped
        return run_batch([self.dataset[i] for i in range(len(self.dataset))], self.output_dir, self.network,
                         overwrite=self.overwrite, inferer=self.inferer, **self.options)
