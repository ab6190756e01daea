"""Writing the simulated dataset as BIDS: file names, JSON sidecars (times in seconds), participants.tsv, descriptions.
Every write is atomic (a temporary name in the same folder, then ``os.replace``)."""

from __future__ import annotations

import json
import os
import tempfile

import nibabel as nib
import numpy as np

from ..prompt import BIDS_SUFFIX
from .acquisition import Geometry
from .presets import Subject
from .sequences import Sequence

BIDS_VERSION = "1.9.0"
DERIVATIVE_NAME = "simulator"
_SEQUENCE_NAMES = {  # (PulseSequenceType, ScanningSequence) per simulated sequence kind
    "SE": ("Spin Echo", "SE"), "IR": ("Inversion Recovery", "IR"), "MPRAGE": ("MPRAGE", "GR\\IR"),
    "GRE": ("Spoiled Gradient Echo", "GR"), "SWI": ("Susceptibility Weighted Imaging", "GR"),
}


def _atomic_write(path: str, write) -> None:
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    # Keep the real extension last: nibabel picks the format (and gzip) from the file name.
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix="-" + name, dir=folder or ".")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save_nifti(path: str, data: np.ndarray, affine: np.ndarray, dtype=None) -> None:
    """``dtype`` given: stored as that type with the scale factor nibabel chooses (readers get ``data`` back)."""
    image = nib.Nifti1Image(data, affine)
    if dtype is not None:
        image.set_data_dtype(dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    _atomic_write(path, lambda p: nib.save(image, p))


def save_json(path: str, content: dict) -> None:
    def write(p):
        with open(p, "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
    _atomic_write(path, write)


def save_text(path: str, text: str) -> None:
    def write(p):
        with open(p, "w") as f:
            f.write(text)
    _atomic_write(path, write)


def image_stem(participant_id: str, modality: str, acq: str | None = None) -> str:
    """``sub-X[_acq-Y][_ce-gadolinium]_<suffix>``, entities in BIDS order."""
    parts = [f"sub-{participant_id}"]
    if acq:
        parts.append(f"acq-{acq}")
    if modality == "T1CE":
        parts.append("ce-gadolinium")
    parts.append(BIDS_SUFFIX[modality])
    return "_".join(parts)


def _seconds(ms: float) -> float:
    return round(ms / 1000.0, 8)


def sidecar(subject: Subject, modality: str, sequence: Sequence, geometry: Geometry | None, voxel_mm: float,
            snr: float) -> dict:
    """BIDS sidecar holding exactly the parameters the image was simulated with."""
    pulse_sequence, scanning_sequence = _SEQUENCE_NAMES[sequence.kind]
    content = {
        "Manufacturer": subject.manufacturer,
        "MagneticFieldStrength": subject.field_strength,
        "InstitutionName": subject.site,
        "PulseSequenceType": pulse_sequence,
        "ScanningSequence": scanning_sequence,
        "MRAcquisitionType": "3D" if geometry is None else "2D",
        "RepetitionTime": _seconds(sequence.tr),
        "EchoTime": _seconds(sequence.te),
        "FlipAngle": sequence.fa,
        "SliceThickness": voxel_mm if geometry is None else geometry.thickness_mm,
    }
    if sequence.ti is not None:
        content["InversionTime"] = _seconds(sequence.ti)
    if sequence.kind == "MPRAGE":
        content["RepetitionTimeExcitation"] = _seconds(sequence.echo_spacing)
    if geometry is not None and geometry.gap_mm:
        content["SpacingBetweenSlices"] = geometry.thickness_mm + geometry.gap_mm
    if modality == "T1CE":
        content["ContrastBolusIngredient"] = "GADOLINIUM"
    content["SimulatedSNR"] = round(snr, 2)  # not a BIDS field: the white-matter SNR the noise was drawn for
    return content


def write_participants(root: str, subjects: list[Subject]) -> None:
    rows = ["participant_id\tage\tsex\tsite"]
    rows += [f"sub-{s.participant_id}\t{s.age:g}\t{s.sex}\t{s.site}" for s in subjects]
    save_text(os.path.join(root, "participants.tsv"), "\n".join(rows) + "\n")
    save_json(os.path.join(root, "participants.json"), {
        "age": {"Description": "age at scan", "Units": "year"},
        "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
        "site": {"Description": "simulated site protocol preset (scripts.simulator.presets)"},
    })


def write_descriptions(root: str, seed: int) -> None:
    generated_by = [{"Name": "TUMSyn MR-physics simulator", "Description": f"scripts.simulator, seed {seed}"}]
    save_json(os.path.join(root, "dataset_description.json"), {
        "Name": "TUMSyn simulated multi-contrast brain MRI", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
        "License": "CC0", "GeneratedBy": generated_by,
    })
    save_json(os.path.join(root, "derivatives", DERIVATIVE_NAME, "dataset_description.json"), {
        "Name": "Simulator ground truth: tissue fractions and brain masks on the 1 mm truth grid",
        "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative", "GeneratedBy": generated_by,
    })
