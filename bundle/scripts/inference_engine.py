"""Whole-volume inference: any scan + a target prompt -> the requested contrast at the requested voxel size.

The engine (windows, latent slab, decoding) and its MONAI ``Inferer`` are ``scripts.synthesis_engine``.

Geometry (``output_grid``): the output tiles the input's field of view at the target voxel size (rounded so the
FOV edges coincide), keeps the input's orientation and direction cosines (oblique stays oblique), and the network
sees every input in the closest RAS+ voxel order, as it saw its training data.

Driver (``run_inference``, ``run_batch``, ``SynthesisRunner`` for ``configs/inference.yaml``): loads and checks the
input, resolves the prompts, writes ``<stem>_<modality>.nii.gz``, a PNG preview and a JSON sidecar (last, so a
sidecar marks a finished case), each atomically.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch

import scripts

from .coarse_pass import COARSE_PASS_VOLUMES
from .errors import UserInputError, config_null, guard_text_fields, one_line
from .guided_filter import GUIDED_FILTER_VOLUMES, guides
from .intensity import normalize_intensity
from .ood import ood_warnings
from .preview import save_preview
from .prompt import MODALITIES, Prompt, PromptError, canonical_modality, prompt_from_image, tokenize
from .synthesis_engine import AUTO, TUMSynInferer, foreground_mask
from .volume_io import Volume, atomic_path, check_memory, load_volume, save_nifti

logger = logging.getLogger(__name__)

# Bytes per output voxel held at once: the float32 prediction, its resampled mask and a copy on write.
OUTPUT_BYTES_PER_VOXEL = 12
# averaging several predictions (flip_averaging, intensity_scales) holds two more: the running sum and the next
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
        volume.warnings.append(f"no source prompt: {error}")
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


def output_paths(input_image: str, modality: str, output_dir: str) -> dict[str, str]:
    """Where a case's files go: ``<output_dir>/<input stem>_<modality>.{nii.gz,png,json}``."""
    base = os.path.join(output_dir, f"{_stem(input_image)}_{modality}")
    return {"image": base + ".nii.gz", "preview": base + ".png", "sidecar": base + ".json"}


def is_finished(paths: dict[str, str]) -> bool:
    """A case is done when its sidecar (written last) parses and names an image of the recorded size."""
    try:
        with open(paths["sidecar"]) as handle:
            record = json.load(handle)
        return os.path.getsize(paths["image"]) == record["output_bytes"]
    except (OSError, ValueError, KeyError, TypeError):
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


# The sidecar's statement of the output's intensity scale, per input normalisation.
INTENSITY_NOTES = {
    "percentile": "normalised (brain 99th percentile of the input = 1), float32",
    "wm_peak": "normalised (white-matter peak of the input = 0.8), float32",
    "landmarks": "normalised (input percentiles mapped onto the training images' of its modality), float32",
}


def synthesize_image(volume: Volume, target: Prompt, network: torch.nn.Module, inferer: TUMSynInferer,
                     spacing: Sequence[float] | None = None,
                     source_modality: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The synthesized image (float32, the input's voxel order) and its affine on the grid tiling the input's FOV at
    ``spacing`` (default: the target prompt's voxel size); the background (the input's zeros) stays 0.
    ``source_modality`` (the input's contrast) is needed by the ``landmarks`` input normalisation and picks the
    factors of ``"auto"`` intensity scales (1.0 when unknown)."""
    if inferer.input_normalisation == "landmarks" and source_modality is None:
        raise UserInputError(f"{volume.path}: input_normalisation 'landmarks' needs the input's modality, and its "
                             f"metadata (BIDS name or sidecar, DICOM header) does not give it")
    inferer = inferer.resolved(source_modality, target.modality)
    spacing = target.voxel_size if spacing is None else spacing
    out_shape, out_affine = output_grid(volume.array.shape, volume.affine, spacing)
    per_voxel = (OUTPUT_BYTES_PER_VOXEL + (AVERAGING_BYTES_PER_VOXEL if inferer.predictions_averaged > 1 else 0)
                 + (4 * GUIDED_FILTER_VOLUMES if inferer.guided_filter_radius else 0)
                 + (4 * COARSE_PASS_VOLUMES if inferer.runs_coarse_pass(volume.spacing) else 0))
    check_memory(per_voxel * float(np.prod(out_shape)), f"output grid {out_shape} for {volume.path}")
    orientation = _canonical_orientation(volume.affine)
    canonical = nib.orientations.apply_orientation(volume.array, orientation)
    normalised = normalize_intensity(canonical, method=inferer.input_normalisation, modality=source_modality)
    image = torch.from_numpy(np.ascontiguousarray(normalised))[None]
    logger.info("%s -> %s grid %s", volume.path, target.render(), out_shape)
    prediction = inferer(image[None], network, prompt=target, out_shape=_reordered(out_shape, orientation),
                         input_spacing=_reordered(volume.spacing, orientation))[0, 0]
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
                  input_modality: str | None = None) -> dict[str, str]:
    """Synthesise one case and write its image, preview and sidecar; returns their paths.

    ``input_modality``: the input's contrast, for inputs whose metadata (BIDS name or sidecar, DICOM header) does not
    say it, or says it wrong; it picks the ``auto`` intensity scales and the ``landmarks`` normalisation.
    Everything that can be wrong with the input (file, prompt, spacing, memory) is checked before anything is
    written, so a refused case leaves no file behind.
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
    paths = output_paths(input_image, target.modality, output_dir)
    _refuse_overwriting_inputs(paths, [str(input_image), reference])
    # warnings, not refusals (scripts/ood.py)
    out_of_distribution = ood_warnings(volume, target, source_modality)
    auto_scales = inferer.intensity_scales == AUTO
    if auto_scales and source_modality is None:
        volume.warnings.append("intensity_scales auto: the input's contrast is unknown (no BIDS name, sidecar or DICOM "
                               "header gives it), so its intensity scale is kept; --input_modality sets it")
        logger.warning("%s: %s", input_image, volume.warnings[-1])
    inferer = inferer.resolved(source_modality, target.modality)

    # The grid follows the requested numbers, not the prompt's rounding of them (which may round tiny sizes to 0).
    grid_spacing = spacing if spacing is not None else _checked_spacing(target.voxel_size, "prompt 'Voxel size'")
    synthesized, out_affine = synthesize_image(volume, target, network, inferer, grid_spacing, source_modality)
    save_nifti(synthesized, out_affine, paths["image"])
    if preview:
        save_preview(paths["preview"], volume, synthesized, out_affine, reference_volume)
    record = {
        "input_image": os.path.abspath(str(input_image)),
        "output_image": os.path.basename(paths["image"]),
        "output_bytes": os.path.getsize(paths["image"]),
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
        "intensity": INTENSITY_NOTES[inferer.input_normalisation],
        "mirror_images_averaged": len(inferer.mirror_axes),
        "intensity_scales_averaged": list(inferer.intensity_scales),
        "intensity_scales_auto": auto_scales,
        # 0 where the output is too much finer than the input to be guided by it (scripts/guided_filter.py)
        "guided_filter_radius": inferer.guided_filter_radius if guides(volume.array.shape, synthesized.shape) else 0,
        # false where the input's voxels are too coarse to be block-averaged within the trained sizes
        "coarse_pass": inferer.runs_coarse_pass(volume.spacing),
        "warnings": volume.warnings,
        "ood_warnings": out_of_distribution,
    }
    with atomic_path(paths["sidecar"]) as temporary, open(temporary, "w") as handle:
        json.dump(record, handle, indent=2)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Many cases


CASE_KEYS = ("input_image", "prompt", "target_spacing", "reference", "input_modality")


def read_datalist_rows(path: str) -> list:
    """The rows of a CSV datalist (header line) or a JSON list / ``{"data": [...]}``, unchecked."""
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: no such datalist file")
    try:
        with open(path, newline="") as handle:
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
    try:
        for row in rows:
            if path.endswith(".csv") and row.get("target_spacing"):
                row["target_spacing"] = json.loads(row["target_spacing"])
    except ValueError as error:
        raise UserInputError(f"{path}: unreadable target_spacing ({one_line(error)})") from None
    if not rows:
        raise UserInputError(f"{path}: expected a non-empty list of cases with input_image and prompt")
    folder = os.path.dirname(os.path.abspath(path))
    cases = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("input_image") or not row.get("prompt"):
            raise UserInputError(f"{path}: case {number} needs 'input_image' and 'prompt', got {row!r}")
        unknown = set(row) - set(CASE_KEYS)
        if unknown:
            raise UserInputError(f"{path}: case {number} has unknown keys {sorted(unknown)}; expected "
                                 f"{list(CASE_KEYS)}")
        case = {key: row.get(key) or None for key in CASE_KEYS}
        for key in ("input_image", "reference"):
            if case[key]:
                case[key] = os.path.join(folder, case[key])
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


def run_batch(cases: Sequence[dict[str, Any]], output_dir: str, network: torch.nn.Module, *, overwrite: bool = False,
              **options: Any) -> list[dict[str, str]]:
    """``run_inference`` per case, skipping finished ones (their sidecar) unless ``overwrite``.

    A case refused for its input (or a failed write) does not stop the others; the run then ends with one error
    naming how many failed and why. Any other exception is a bug and stops the run.
    """
    done, failures = [], []
    for case in cases:
        try:
            if not overwrite:
                modality = _target_modality(case["prompt"])
                paths = output_paths(case["input_image"], modality, output_dir)
                if modality and is_finished(paths):
                    logger.info("skipping %s: already finished (%s)", case["input_image"], paths["sidecar"])
                    done.append(paths)
                    continue
            done.append(run_inference(case["input_image"], case["prompt"], output_dir, network,
                                      case.get("target_spacing"), case.get("reference"),
                                      input_modality=case.get("input_modality"), **options))
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
        written = run_batch([self.dataset[i] for i in range(len(self.dataset))], self.output_dir, self.network,
                            overwrite=self.overwrite, inferer=self.inferer, **self.options)
        for paths in written:
            logger.info("wrote %s", paths["image"])
        return written


# The config's `prompt` is user text: MONAI's parser must never evaluate it (scripts.errors); the inference config
# imports this module before it reads the prompt.
guard_text_fields()
