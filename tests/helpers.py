"""Small writers of real-shaped test inputs (DICOM series, BIDS images) shared by the tests."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np


def write_dicom_series(folder: str, volume: np.ndarray, spacing=(1.0, 1.0, 2.0), **header) -> list[str]:
    """An axial MR series (one file per slice along the last axis) with ``header`` keywords on every slice."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    os.makedirs(folder, exist_ok=True)
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(folder, f"slice{k:03d}.dcm")
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "MR", series_uid, study_uid
        ds.FrameOfReferenceUID, ds.InstanceNumber = frame_uid, k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        for keyword, value in header.items():
            setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_bids_image(root: str, subject: str, stem_suffix: str, volume: np.ndarray, sidecar: dict,
                     zooms=(1.0, 1.0, 1.0), participants: list[dict] | None = None) -> str:
    """``root/sub-X/anat/sub-X_<stem_suffix>.nii.gz`` with its JSON sidecar (and participants.tsv when given)."""
    anat = os.path.join(root, f"sub-{subject}", "anat")
    os.makedirs(anat, exist_ok=True)
    path = os.path.join(anat, f"sub-{subject}_{stem_suffix}.nii.gz")
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([*zooms, 1.0])), path)
    with open(path.replace(".nii.gz", ".json"), "w") as handle:
        json.dump(sidecar, handle)
    if participants is not None:
        columns = list(participants[0])
        rows = ["\t".join(columns)] + ["\t".join(str(p[c]) for c in columns) for p in participants]
        with open(os.path.join(root, "participants.tsv"), "w") as handle:
            handle.write("\n".join(rows) + "\n")
    return path
