"""The TUMSyn text prompt: one typed record, the official template, builders from real metadata, tokenisation.

The official template (TUMSyn README), one string per image; note the two spaces before the parameter tuple:

    Age: 16; Gender: F; Scanner: 3.0 Siemens; Modality: T1w; Voxel size: (0.8, 0.8, 0.8); Imaging parameter TR(ms),
    TE(ms), TI(ms), and FA(degree):  (2500.0, 2.2, 1000.0, 8.0)

Missing facts are written ``None``. Values are canonicalised on construction (numbers rounded to two decimals, vendor
names to one short word) so that ``Prompt.parse(p.render()) == p`` and a rendered prompt stays inside the 90-token
context of the CLIP BPE tokenizer, where every digit costs one token.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from .errors import UserInputError, quoted

MODALITIES = ("T1w", "T2w", "FLAIR", "SWI", "T2star", "PD", "T1CE")
CONTEXT_LENGTH = 90

# BIDS suffix of each modality; T1CE is a T1w with the entity ``ce-gadolinium``.
BIDS_SUFFIX = {"T1w": "T1w", "T2w": "T2w", "FLAIR": "FLAIR", "SWI": "swi", "T2star": "T2starw", "PD": "PDw",
               "T1CE": "T1w"}

_MODALITY_ALIASES = {
    "t1w": "T1w", "t1": "T1w", "t1-weighted": "T1w", "mprage": "T1w", "spgr": "T1w", "t1ce": "T1CE", "t1c": "T1CE",
    "t1gd": "T1CE", "t1-gd": "T1CE", "t1+c": "T1CE", "t1post": "T1CE", "ce-gadolinium t1w": "T1CE",
    "ce-gadolinium_t1w": "T1CE", "t2w": "T2w", "t2": "T2w", "t2-weighted": "T2w", "flair": "FLAIR", "t2flair": "FLAIR",
    "t2-flair": "FLAIR", "swi": "SWI", "t2star": "T2star", "t2*": "T2star", "t2s": "T2star", "t2starw": "T2star",
    "t2*w": "T2star", "pd": "PD", "pdw": "PD", "pd-weighted": "PD",
}

# One short word per vendor: long DICOM strings ("SIEMENS HEALTHINEERS") would overflow the 90-token context.
_VENDORS = (("siemens", "Siemens"), ("ge ", "GE"), ("general electric", "GE"), ("philips", "Philips"),
            ("toshiba", "Toshiba"), ("canon", "Canon"), ("hitachi", "Hitachi"), ("united imaging", "UIH"),
            ("uih", "UIH"), ("fuji", "Fujifilm"))

_PARAMETERS_KEY = "Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree)"
_FIELDS = {"age": "age", "gender": "sex", "sex": "sex", "scanner": "scanner", "modality": "modality",
           "voxel size": "voxel_size", _PARAMETERS_KEY.lower(): "parameters"}


class PromptError(UserInputError):
    """A prompt, or the metadata it is built from, cannot be read; the message names the field and what was expected."""


def canonical_modality(name: str) -> str:
    """The canonical modality for ``name`` (case-insensitive, aliases such as T2*, PDw, T1Gd accepted)."""
    key = re.sub(r"\s+", " ", str(name).strip().lower())
    if key in _MODALITY_ALIASES:
        return _MODALITY_ALIASES[key]
    raise PromptError(f"prompt field 'Modality': expected one of {', '.join(MODALITIES)} (or an alias), "
                      f"got {quoted(name)}")


def canonical_vendor(name: str) -> str:
    """One short vendor word for a manufacturer string; an unknown vendor keeps its first word."""
    text = " ".join(str(name).split())
    lowered = text.lower() + " "
    for needle, vendor in _VENDORS:
        if lowered.startswith(needle) or f" {needle}" in f" {lowered}":
            return vendor
    if not text:
        raise PromptError("prompt field 'Scanner': expected a manufacturer name, got an empty string")
    return text.split()[0]


def _round(value: float) -> float:
    """Two decimals, or whole numbers from 100 up: every digit is a token and long times must fit the context."""
    value = float(value)
    return float(round(value)) if abs(value) >= 100 else round(value, 2)


def _number(field: str, value: Any, expected: str) -> float | None:
    """A finite float from a number or numeric text; ``None``/``"None"`` stay missing."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "None", "none", "n/a", "NaN")):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PromptError(f"prompt field {field!r}: expected {expected}, got {quoted(value)}") from None
    if not math.isfinite(number):
        raise PromptError(f"prompt field {field!r}: expected {expected}, got {quoted(value)}")
    return number


def _format_number(value: float) -> str:
    """``2500.0``, ``2.2``, ``0.86``: one decimal at least (the official style), two at most."""
    return f"{value:.1f}" if round(value, 1) == value else f"{value:.2f}"


def _format_age(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else _format_number(value)


def _text(value: Any) -> str:
    return "None" if value is None else str(value)


@dataclass(frozen=True)
class Prompt:
    """What the model is told about one image; every field but the modality may be unknown (``None``).

    Times are in milliseconds, the flip angle in degrees (or a text such as ``T2var`` for variable-flip-angle
    sequences), the voxel size in millimetres, the field strength in tesla.
    """

    modality: str
    age: float | None = None
    sex: str | None = None
    field_strength: float | None = None
    manufacturer: str | None = None
    voxel_size: tuple[float, float, float] | None = None
    tr: float | None = None
    te: float | None = None
    ti: float | None = None
    fa: float | str | None = None

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        if self.modality is None or not str(self.modality).strip():
            raise PromptError("prompt field 'Modality': the target modality is required, got nothing")
        put("modality", canonical_modality(self.modality))
        age = _number("Age", self.age, "an age in years or None")
        if age is not None and not 0 <= age <= 130:
            raise PromptError(f"prompt field 'Age': expected years between 0 and 130, got {quoted(self.age)}")
        put("age", None if age is None else _round(age))
        put("sex", _canonical_sex(self.sex))
        field = _number("Scanner", self.field_strength, "a field strength in tesla or None")
        if field is not None and not 0 < field <= 12:
            raise PromptError("prompt field 'Scanner': expected a field strength in (0, 12] T, "
                              f"got {quoted(self.field_strength)}")
        put("field_strength", None if field is None else _round(field))
        put("manufacturer", None if _is_missing(self.manufacturer) else canonical_vendor(self.manufacturer))
        put("voxel_size", _canonical_voxel_size(self.voxel_size))
        for name, label in (("tr", "TR"), ("te", "TE"), ("ti", "TI")):
            value = _number(label, getattr(self, name), f"{label} in ms (a positive number) or None")
            if value is not None and (value < 0 or (value == 0 and name != "te")):
                raise PromptError(f"prompt field {label!r}: expected a positive time in ms, "
                                  f"got {quoted(getattr(self, name))}")
            put(name, None if value is None else _round(value))
        if self.tr is not None and self.te is not None and self.te > self.tr:
            raise PromptError(f"prompt fields 'TE'/'TR': TE {self.te} ms cannot exceed TR {self.tr} ms")
        if self.tr is not None and self.ti is not None and self.ti > self.tr:
            raise PromptError(f"prompt fields 'TI'/'TR': TI {self.ti} ms cannot exceed TR {self.tr} ms")
        put("fa", _canonical_flip_angle(self.fa))

    def render(self) -> str:
        """The official template string."""
        if self.field_strength is None and self.manufacturer is None:
            scanner = "None"
        else:
            field = None if self.field_strength is None else _format_number(self.field_strength)
            scanner = f"{_text(field)} {_text(self.manufacturer)}"
        voxel = "None" if self.voxel_size is None else "(" + ", ".join(map(_format_number, self.voxel_size)) + ")"
        times = [None if t is None else _format_number(t) for t in (self.tr, self.te, self.ti)]
        fa = _format_number(self.fa) if isinstance(self.fa, float) else self.fa
        parameters = "(" + ", ".join(_text(v) for v in (*times, fa)) + ")"
        age = None if self.age is None else _format_age(self.age)
        return (f"Age: {_text(age)}; Gender: {_text(self.sex)}; Scanner: {scanner}; Modality: {self.modality}; "
                f"Voxel size: {voxel}; {_PARAMETERS_KEY}:  {parameters}")

    def __str__(self) -> str:
        return self.render()

    def replace(self, **changes: Any) -> Prompt:
        """A copy with some fields changed (validated again); unknown field names are an error."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise PromptError(f"unknown prompt field(s) {sorted(unknown)}; expected some of {prompt_field_names()}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def parse(cls, text: str) -> Prompt:
        """Read a prompt in the official template (field order free, spacing tolerant)."""
        if not isinstance(text, str) or not text.strip():
            raise PromptError("prompt: expected the official template 'Age: ...; Modality: ...; ...', "
                              "got an empty prompt")
        values: dict[str, Any] = {}
        for part in text.strip().rstrip(";").split(";"):
            key, colon, value = part.partition(":")
            field = _FIELDS.get(" ".join(key.split()).lower())
            if not colon or field is None:
                raise PromptError(f"prompt: cannot read {quoted(part.strip())}; expected 'Field: value' with a field "
                                  "among Age, Gender, Scanner, Modality, Voxel size, Imaging parameter")
            values[field] = value.strip()
        if "modality" not in values:
            raise PromptError(f"prompt field 'Modality': missing in {quoted(text)}")
        fields: dict[str, Any] = {"modality": values["modality"], "age": values.get("age"),
                                  "sex": values.get("sex")}
        fields["field_strength"], fields["manufacturer"] = _parse_scanner(values.get("scanner", "None"))
        voxel = _parse_tuple("Voxel size", values.get("voxel_size", "None"), 3)
        fields["voxel_size"] = None if voxel is None else tuple(voxel)
        parameters = _parse_tuple("Imaging parameter", values.get("parameters", "None"), 4) or [None] * 4
        fields["tr"], fields["te"], fields["ti"], fields["fa"] = parameters
        return cls(**fields)


def prompt_field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Prompt)]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in ("", "None", "none"))


def _canonical_sex(value: Any) -> str | None:
    if _is_missing(value):
        return None
    key = str(value).strip().lower()
    if key in ("m", "male"):
        return "M"
    if key in ("f", "female"):
        return "F"
    if key in ("o", "other", "u", "unknown", "n/a"):
        return None
    raise PromptError(f"prompt field 'Gender': expected M, F or None, got {quoted(value)}")


def _canonical_voxel_size(value: Any) -> tuple[float, float, float] | None:
    if _is_missing(value):
        return None
    if isinstance(value, str):
        value = _parse_tuple("Voxel size", value, 3)
        if value is None:
            return None
    try:
        sizes = [_number("Voxel size", v, "three positive sizes in mm") for v in value]
    except TypeError:
        raise PromptError(f"prompt field 'Voxel size': expected three positive sizes in mm, "
                          f"got {quoted(value)}") from None
    if len(sizes) != 3 or any(s is None or s <= 0 for s in sizes):
        raise PromptError(f"prompt field 'Voxel size': expected three positive sizes in mm, got {quoted(value)}")
    return tuple(_round(s) for s in sizes)  # type: ignore[return-value]


def _canonical_flip_angle(value: Any) -> float | str | None:
    if _is_missing(value):
        return None
    try:
        angle = float(value)
    except (TypeError, ValueError):
        text = str(value).strip()
        # A named flip-angle scheme (e.g. T2var) is kept as text; anything with separators would break the template.
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9_+\-]*", text):
            return text
        raise PromptError("prompt field 'FA': expected a flip angle in degrees, a scheme name or None, "
                          f"got {quoted(value)}") from None
    if not math.isfinite(angle) or not 0 < angle <= 180:
        raise PromptError(f"prompt field 'FA': expected a flip angle in (0, 180] degrees, got {quoted(value)}")
    return _round(angle)


def _parse_scanner(text: str) -> tuple[Any, Any]:
    words = text.split(maxsplit=1)
    if not words or (len(words) == 1 and _is_missing(words[0])):
        return None, None
    if len(words) == 1:  # only a field strength, or only a vendor
        return (words[0], None) if re.fullmatch(r"[\d.]+", words[0]) else (None, words[0])
    return words[0], words[1]


def _parse_tuple(field: str, text: str, length: int) -> list[Any] | None:
    if _is_missing(text):
        return None
    inner = text.strip()
    if not (inner.startswith("(") and inner.endswith(")")):
        raise PromptError(f"prompt field {field!r}: expected a tuple of {length} values in parentheses, "
                          f"got {quoted(text)}")
    items = [item.strip() for item in inner[1:-1].split(",")]
    if len(items) != length:
        raise PromptError(f"prompt field {field!r}: expected {length} values, got {len(items)} in {quoted(text)}")
    return items


# ---------------------------------------------------------------------------------------------------------------
# Builders: harvest what real metadata says; explicit user values override harvested ones.


def _merge(harvested: dict[str, Any], overrides: dict[str, Any], source: str) -> Prompt:
    unknown = set(overrides) - set(prompt_field_names())
    if unknown:
        raise PromptError(f"unknown prompt field(s) {sorted(unknown)}; expected some of {prompt_field_names()}")
    fields = {**harvested, **{k: v for k, v in overrides.items() if v is not None}}
    if _is_missing(fields.get("modality")):
        raise PromptError(f"{source}: cannot tell the modality from its metadata; give it explicitly (--modality)")
    return Prompt(**fields)


def _nifti_voxel_size(path: str) -> tuple[float, float, float] | None:
    import nibabel as nib

    try:
        zooms = nib.load(path).header.get_zooms()
    except Exception as error:  # nibabel raises many types for unreadable files
        raise PromptError(f"{path}: not a readable NIfTI image ({error.__class__.__name__}: {error})") from None
    if len(zooms) < 3:
        raise PromptError(f"{path}: expected a 3D image, got {len(zooms)} dimension(s)")
    return tuple(float(z) for z in zooms[:3])  # type: ignore[return-value]


def _strip_nifti_extension(path: str) -> str:
    for extension in (".nii.gz", ".nii"):
        if path.endswith(extension):
            return path[: -len(extension)]
    return os.path.splitext(path)[0]


def bids_modality(filename: str) -> str | None:
    """The modality a BIDS file name declares (suffix plus the ``ce-`` entity), or None for other suffixes."""
    stem = os.path.basename(_strip_nifti_extension(filename))
    entities = stem.split("_")
    suffix = entities[-1]
    if suffix == "T1w" and any(e.startswith("ce-") for e in entities[:-1]):
        return "T1CE"
    for modality, bids_suffix in BIDS_SUFFIX.items():
        if suffix == bids_suffix and modality != "T1CE":
            return modality
    return None


def _bids_root(image_path: str) -> str | None:
    folder = os.path.dirname(os.path.abspath(image_path))
    for _ in range(4):  # sub-X/[ses-Y/]anat/file: the dataset root is at most three levels up
        if any(os.path.isfile(os.path.join(folder, f)) for f in ("participants.tsv", "dataset_description.json")):
            return folder
        folder = os.path.dirname(folder)
    return None


def _participant(root: str | None, subject: str) -> dict[str, str]:
    if root is None or not os.path.isfile(os.path.join(root, "participants.tsv")):
        return {}
    with open(os.path.join(root, "participants.tsv"), newline="") as table:
        for row in csv.DictReader(table, delimiter="\t"):
            if row.get("participant_id") in (subject, subject.replace("sub-", "")):
                return {k: v for k, v in row.items() if v not in (None, "", "n/a")}
    return {}


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise PromptError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a JSON object of BIDS metadata")
    return data


def _seconds_to_ms(sidecar: dict[str, Any], key: str, path: str) -> float | None:
    value = _number(f"{key} in {path}", sidecar.get(key), "seconds (BIDS)")
    return None if value is None else value * 1000.0


def prompt_from_bids(image_path: str, **overrides: Any) -> Prompt:
    """The prompt of a BIDS image: its JSON sidecar (times in seconds), the dataset's participants.tsv, its header."""
    if not os.path.isfile(image_path):
        raise PromptError(f"{image_path}: no such image file")
    sidecar_path = _strip_nifti_extension(image_path) + ".json"
    sidecar = _read_json(sidecar_path) if os.path.isfile(sidecar_path) else {}
    subject = os.path.basename(image_path).split("_")[0]
    participant = _participant(_bids_root(image_path), subject)
    harvested = {
        "modality": bids_modality(image_path),
        "age": participant.get("age"),
        "sex": participant.get("sex"),
        "field_strength": sidecar.get("MagneticFieldStrength"),
        "manufacturer": sidecar.get("Manufacturer"),
        "voxel_size": _nifti_voxel_size(image_path),
        "tr": _seconds_to_ms(sidecar, "RepetitionTime", sidecar_path),
        "te": _seconds_to_ms(sidecar, "EchoTime", sidecar_path),
        "ti": _seconds_to_ms(sidecar, "InversionTime", sidecar_path),
        "fa": sidecar.get("FlipAngle"),
    }
    return _merge(harvested, overrides, image_path)


_SERIES_HINTS = (("flair", "FLAIR"), ("swi", "SWI"), ("t2*", "T2star"), ("t2star", "T2star"), ("gre", "T2star"),
                 ("pd", "PD"), ("t2", "T2w"), ("mprage", "T1w"), ("t1", "T1w"), ("spgr", "T1w"))


def modality_from_series_description(description: str, contrast_agent: bool = False) -> str | None:
    """A best guess at the modality from a DICOM SeriesDescription/ProtocolName."""
    text = description.lower()
    for hint, modality in _SERIES_HINTS:
        if hint in text:
            post_contrast = contrast_agent or any(h in text for h in ("+c", "gd", "post", "contrast", " ce"))
            return "T1CE" if modality == "T1w" and post_contrast else modality
    return None


def _dicom_age(value: Any) -> float | None:
    """DICOM AgeString: ``045Y``, ``006M``, ``010W``, ``003D``."""
    match = re.fullmatch(r"(\d{1,3})([DWMY])", str(value or "").strip())
    if not match:
        return None
    scale = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}[match.group(2)]
    return int(match.group(1)) * scale


def _first_dicom_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate) and not name.startswith("."):
                return candidate
    raise PromptError(f"{path}: expected a DICOM file or a series directory holding DICOM files")


def prompt_from_dicom(path: str, **overrides: Any) -> Prompt:
    """The prompt from a DICOM file or series directory header (pydicom)."""
    import pydicom

    filename = _first_dicom_file(path)
    try:
        header = pydicom.dcmread(filename, stop_before_pixels=True)
    except Exception as error:  # pydicom raises InvalidDicomError and others
        raise PromptError(f"{filename}: not a readable DICOM file ({error})") from None
    description = " ".join(str(header.get(k, "")) for k in ("SeriesDescription", "ProtocolName"))
    spacing = header.get("PixelSpacing")
    through_plane = header.get("SpacingBetweenSlices") or header.get("SliceThickness")
    voxel = None if spacing is None or through_plane is None else (*map(float, spacing), float(through_plane))
    harvested = {
        "modality": modality_from_series_description(description, bool(header.get("ContrastBolusAgent"))),
        "age": _dicom_age(header.get("PatientAge")),
        "sex": header.get("PatientSex") or None,
        "field_strength": header.get("MagneticFieldStrength"),
        "manufacturer": header.get("Manufacturer") or None,
        "voxel_size": voxel,
        "tr": header.get("RepetitionTime"),
        "te": header.get("EchoTime"),
        "ti": header.get("InversionTime"),
        "fa": header.get("FlipAngle"),
    }
    return _merge({k: (None if v == "" else v) for k, v in harvested.items()}, overrides, filename)


def prompt_from_image(path: str, **overrides: Any) -> Prompt:
    """The prompt from whatever metadata an image carries: BIDS sidecar + participants.tsv, DICOM, NIfTI header."""
    if not os.path.exists(path):
        raise PromptError(f"{path}: no such file or directory")
    if path.endswith((".nii", ".nii.gz")):
        return prompt_from_bids(path, **overrides)
    return prompt_from_dicom(path, **overrides)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=CONTEXT_LENGTH)


def count_tokens(text: str) -> int:
    """Tokens the text encoder reads for ``text``, start and end tokens included."""
    return len(_tokenizer().encode(text)) + 2


def tokenize(texts: str | list[str]):
    """Token ids ``[B, 90]`` (open_clip BPE); a prompt longer than the context is an error, never truncated."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for text in texts:
        length = count_tokens(text)
        if length > CONTEXT_LENGTH:
            raise PromptError(f"prompt is {length} tokens long, the text encoder reads at most {CONTEXT_LENGTH} "
                              f"(start and end included): {quoted(text)}")
    return _tokenizer()(texts)
