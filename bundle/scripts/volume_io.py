"""Reading and writing the volumes inference works on: NIfTI in any orientation and DICOM series directories.

Every input is checked before a network sees it, and every problem is one ``ValueError`` line naming the file and
what was expected, so a clinical user knows what to fix. Arrays keep the file's voxel order; the affine maps voxel
indices to RAS+ millimetres (the NIfTI convention), so DICOM's LPS geometry is converted on load.
Writes are atomic: a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import zlib
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

NAN_POLICIES = ("refuse", "repair")

# Working copies inference keeps of the input alongside the file's own data (float32 array, normalised copy,
# canonical view): the memory estimate multiplies the float32 size by this.
INPUT_COPIES = 4

# DICOM (LPS+) to NIfTI (RAS+) world axes: x and y flip sign.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A checked 3D image: ``array`` float32 in file voxel order, ``affine`` voxel index -> RAS+ mm."""

    array: np.ndarray
    affine: np.ndarray
    path: str
    warnings: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along each array axis (the lengths of the affine's columns), mm."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def available_memory_bytes() -> int:
    """Memory the OS can still hand out (MemAvailable on Linux, else physical memory)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(needed_bytes: float, what: str) -> None:
    """Refuse before allocating when ``needed_bytes`` exceeds what the machine has free."""
    available = available_memory_bytes()
    if needed_bytes > available:
        raise ValueError(f"{what}: needs about {needed_bytes / 2**30:.1f} GiB of memory, "
                         f"only {available / 2**30:.1f} GiB is available")


def load_volume(path: str, volume_index: int | None = None, nan_policy: str = "refuse") -> Volume:
    """Read and check a NIfTI file or a DICOM series directory.

    ``volume_index`` picks one volume of a 4D file; ``nan_policy`` is ``refuse`` (error on NaN/Inf voxels) or
    ``repair`` (set them to 0 and record a warning).
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy: expected one of {NAN_POLICIES}, got {nan_policy!r}")
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    notes: list[str] = []
    if os.path.isdir(path):
        array, affine = _read_dicom_series(path, notes)
    else:
        array, affine = _read_nifti(path, volume_index)
    volume = Volume(array=array, affine=affine, path=path, warnings=notes)
    _check_affine(volume)
    _check_values(volume, nan_policy)
    return volume


def _spatial_shape(path: str, shape: tuple[int, ...], volume_index: int | None) -> tuple[tuple[int, ...], int | None]:
    """The 3D shape to read and the 4th-axis index to take, or a one-line error for 2D/4D+ data."""
    if len(shape) == 4 and shape[3] == 1:
        shape, volume_index = shape[:3], 0
    elif len(shape) == 4:
        if volume_index is None:
            raise ValueError(f"{path}: a 4D series of {shape[3]} volumes (shape {shape}); pick one with volume_index "
                             f"(0..{shape[3] - 1})")
        if not 0 <= volume_index < shape[3]:
            raise ValueError(f"{path}: volume_index {volume_index} is outside 0..{shape[3] - 1}")
        shape = shape[:3]
    elif len(shape) > 4:
        raise ValueError(f"{path}: expected a 3D volume, got {len(shape)} dimensions (shape {shape})")
    else:
        volume_index = None
    if len(shape) < 3 or min(shape) < 2:
        raise ValueError(f"{path}: a 2D image (shape {shape}); expected a 3D volume with at least 2 voxels per axis")
    return shape, volume_index


def _read_nifti(path: str, volume_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises ImageFileError, OSError, EOFError... for non-images
        raise ValueError(f"{path}: not a readable NIfTI image ({error.__class__.__name__}: {error})") from None
    shape, volume_index = _spatial_shape(path, tuple(int(n) for n in image.shape), volume_index)
    check_memory(INPUT_COPIES * 4 * float(np.prod(shape)), f"{path} (shape {shape})")
    try:
        data = image.dataobj if volume_index is None else image.dataobj[..., volume_index]
        array = np.asarray(data, dtype=np.float32)
    except (EOFError, zlib.error, OSError, ValueError) as error:  # a cut .nii.gz fails only while decompressing
        raise ValueError(f"{path}: truncated or corrupt image data ({error.__class__.__name__}: {error})") from None
    return array.reshape(shape), np.asarray(image.affine, dtype=np.float64)


def _read_dicom_series(folder: str, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import itk

    names_generator = itk.GDCMSeriesFileNames.New(Directory=folder)
    series = list(names_generator.GetSeriesUIDs())
    if not series:
        raise ValueError(f"{folder}: no DICOM series found in this directory")
    if len(series) > 1:  # the largest series is usually the scan, smaller ones localisers
        notes.append(f"{folder}: {len(series)} DICOM series found, read the one with the most files")
    files = max((list(names_generator.GetFileNames(uid)) for uid in series), key=len)
    try:
        image = itk.imread(files, itk.F)
    except Exception as error:  # ITK raises RuntimeError with a long C++ message
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
        raise ValueError(f"{folder}: unreadable DICOM series ({first_line})") from None
    array = itk.array_from_image(image).transpose(2, 1, 0)  # ITK's numpy view is (z, y, x); keep index (i, j, k)
    if array.ndim != 3 or min(array.shape) < 2:
        raise ValueError(f"{folder}: a 2D image (shape {array.shape}); expected a 3D series of at least 2 slices")
    direction = np.asarray(image.GetDirection(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return np.ascontiguousarray(array, dtype=np.float32), _LPS_TO_RAS @ affine


def _check_affine(volume: Volume) -> None:
    linear = volume.affine[:3, :3]
    finite = bool(np.all(np.isfinite(volume.affine)))
    singular_values = np.linalg.svd(linear, compute_uv=False) if finite else None
    if not finite or singular_values.min() <= 1e-6 * singular_values.max():
        raise ValueError(f"{volume.path}: non-invertible voxel-to-world affine (zero or non-finite voxel size or "
                         f"collinear axes): {np.round(linear, 4).tolist()}")


def _check_values(volume: Volume, nan_policy: str) -> None:
    finite = np.isfinite(volume.array)
    bad = int(finite.size - np.count_nonzero(finite))
    if bad:
        if nan_policy == "refuse":
            raise ValueError(f"{volume.path}: {bad} NaN/Inf voxels; repair them (nan_policy='repair' sets them to 0) "
                             f"or fix the file")
        volume.array[~finite] = 0.0
        volume.warnings.append(f"{volume.path}: {bad} NaN/Inf voxels were set to 0")
    low, high = float(volume.array.min()), float(volume.array.max())
    if low == high:
        raise ValueError(f"{volume.path}: a constant image (every voxel is {low}); expected an MR volume")


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary name beside ``path`` (same extension) to write to; it replaces ``path`` on success only."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".tmp-{uuid.uuid4().hex[:8]}-{os.path.basename(path)}")
    try:
        yield temporary
        with open(temporary, "rb") as written:  # flush to disk before the rename makes it visible
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """Write a float32 NIfTI with ``affine`` as both sform and qform (scanner space, mm), atomically."""
    image = nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as temporary:
        nib.save(image, temporary)
