"""Small writers of real-shaped test inputs (NIfTI, DICOM series, BIDS images) and a stand-in network, shared by the
tests."""

from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from conftest import BUNDLE_ROOT
from scripts.engine.synthesis_engine import TUMSynInferer


def python_environment(**extra: str) -> dict[str, str]:
    """This process's environment for a child Python that imports the bundle's ``scripts``: the bundle folder goes in
    front of PYTHONPATH rather than replacing it, so an install whose packages come from PYTHONPATH still imports."""
    search_path = os.pathsep.join(path for path in (BUNDLE_ROOT, os.environ.get("PYTHONPATH")) if path)
    return {**os.environ, "PYTHONPATH": search_path, **extra}


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


# A valid target prompt, and engine settings small enough for test volumes.
T2W_TEMPLATE = ("Age: 40; Gender: M; Scanner: 3.0 Siemens; Modality: T2w; Voxel size: (1.0, 1.0, 1.0); "
                "Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (4000.0, 100.0, None, 90.0)")
FAST = TUMSynInferer(roi_size=(16, 16, 16), query_chunk=4096, progress=False)


class SamplingNet(torch.nn.Module):
    """Stand-in with the TUMSynNet encode/query API: features = image (optionally through a local 3x3x3 conv),
    query = trilinear sampling of feature 0, so the output is the input resampled onto the query grid."""

    def __init__(self, conv: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1) if conv else None
        self.scale = torch.nn.Parameter(torch.ones(()))  # gives the engine a device to read

    def embed_condition(self, tokens=None, modality=None, source=None):
        return None  # no conditioning: the stand-in only resamples

    def encode(self, image, tokens=None, modality=None, condition=None):
        return self.conv(image) if self.conv is not None else image * self.scale

    def query(self, features, coords, cell, chunk_size=None):
        grid = coords.flip(-1)[:, :, None, None, :]  # grid_sample wants (W, H, D) order
        sampled = F.grid_sample(features, grid, mode="bilinear", align_corners=False, padding_mode="border")
        return sampled[:, :1, :, 0, 0].transpose(1, 2)


def blob_volume(shape, affine, landmark, sigma_mm=4.0):
    """A Gaussian blob centred on the world point ``landmark`` plus a dim pedestal (non-zero everywhere)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    distance2 = ((world - np.asarray(landmark)) ** 2).sum(-1)
    return (0.1 + np.exp(-distance2 / (2 * sigma_mm**2))).astype(np.float32)


def write_nifti(path, data, affine, dtype=np.float32):
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), affine), str(path))
    return str(path)


def write_raw_nifti(path, shape, data: bytes, sform=None, pixdim=None):
    """A NIfTI written byte by byte, for headers nibabel refuses to produce (``sform``: 3x4 rows, taken as is;
    ``pixdim``: the three voxel sizes, taken as is)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    if pixdim is not None:
        header["pixdim"][1:4] = pixdim
    if sform is not None:
        header["srow_x"], header["srow_y"], header["srow_z"] = sform
        header["sform_code"] = 1
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 4 + data)
    return str(path)


def files_in(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


T2W = "Modality: T2w; Voxel size: (1.0, 1.0, 1.0)"


def phantom(shape=(28, 28, 28), seed=0):
    """A T1w-like sphere (CSF rim 0.3, grey shell 0.6, white core 0.9, fine dark 'sulci'), its foreground and a
    T2w-like target of the same anatomy (the tissue order inverted)."""
    generator = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = torch.sqrt(sum(a**2 for a in axes))
    foreground = radius < 0.9
    sulci = (torch.sin(9 * axes[0]) * torch.sin(9 * axes[1]) > 0.6) & (radius > 0.55)
    tissue = torch.where(radius < 0.5, 0.9, torch.where(radius < 0.75, 0.6, 0.3))
    tissue = torch.where(sulci, torch.tensor(0.3), tissue)
    t1w = (tissue + 0.01 * torch.randn(shape, generator=generator)) * foreground
    t2w = (1.2 - tissue) * foreground
    return t1w, t2w, foreground
