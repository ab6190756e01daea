"""Reading and writing the volumes inference works on: NIfTI in any orientation and DICOM series directories.

Every input is checked before a network sees it, and every problem is one ``UserInputError`` line naming the file
and what was expected, so a clinical user knows what to fix. Arrays keep the file's voxel order; the affine maps voxel
indices to RAS+ millimetres (the NIfTI convention), so DICOM's LPS geometry is converted on load.
Writes are atomic: a crash never leaves a half-written file under the final name, and the temporary files a killed
run leaves behind are removed by the next (``remove_stale_temporaries``).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
import uuid
import zlib
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from ..errors import UserInputError, one_line

NAN_POLICIES = ("refuse", "repair")

# Working copies inference keeps of the input alongside the file's own data (float32 array, normalised copy,
# canonical view): the memory estimate multiplies the float32 size by this.
INPUT_COPIES = 4

# DICOM (LPS+) to NIfTI (RAS+) world axes: x and y flip sign.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# The most one byte of a deflate stream can expand to (zlib's limit is 1032:1): a .nii.gz holding fewer compressed
# bytes than its header's voxels need at that ratio is cut short, whatever memory the machine has.
MAX_DEFLATE_RATIO = 1032


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
        raise UserInputError(f"{what}: needs about {_bytes_text(needed_bytes)} of memory, only "
                             f"{_bytes_text(available)} is available")


def _bytes_text(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PiB"


def load_volume(path: str, volume_index: int | None = None, nan_policy: str = "refuse") -> Volume:
    """Read and check a NIfTI file or a DICOM series directory.

    ``volume_index`` picks one volume of a 4D file; ``nan_policy`` is ``refuse`` (error on NaN/Inf voxels) or
    ``repair`` (set them to 0 and record a warning).
    """
    if nan_policy not in NAN_POLICIES:
        raise UserInputError(f"nan_policy: expected one of {NAN_POLICIES}, got {nan_policy!r}")
    if volume_index is not None and (isinstance(volume_index, bool) or not isinstance(volume_index, (int, np.integer))):
        raise UserInputError(f"volume_index: expected a whole number (a volume of a 4D series), got {volume_index!r}")
    if not path:
        raise UserInputError("input image: expected a NIfTI file or a DICOM series folder, got an empty path")
    if not os.path.exists(path):
        raise UserInputError(f"{path}: no such file or directory")
    notes: list[str] = []
    if os.path.isdir(path):
        array, affine = _read_dicom_series(path, notes)
    else:
        array, affine = _read_nifti(path, volume_index)
    volume = Volume(array=array, affine=affine, path=path, warnings=notes)
    _check_affine(path, volume.affine)
    _check_values(volume, nan_policy)
    return volume


def _volume_slicer(path: str, shape: tuple[int, ...], volume_index: int | None) -> tuple[tuple[int, ...], tuple]:
    """The 3D shape to read and the index taking it from the file's array, or a one-line error for 2D/4D data.

    Trailing axes of length 1 (a "4D" file of one volume) are dropped; a 4th axis of several volumes needs
    ``volume_index``.
    """
    extra = shape[3:]
    while extra and extra[-1] == 1:
        extra = extra[:-1]
    if len(extra) > 1:
        raise UserInputError(f"{path}: expected a 3D volume, got {len(shape)} dimensions (shape {shape})")
    if extra:
        if volume_index is None:
            raise UserInputError(f"{path}: a 4D series of {extra[0]} volumes (shape {shape}); pick one with "
                                 f"--volume_index (0..{extra[0] - 1})")
        if not 0 <= volume_index < extra[0]:
            raise UserInputError(f"{path}: volume_index {volume_index} is outside 0..{extra[0] - 1}")
    elif volume_index not in (None, 0):
        raise UserInputError(f"{path}: volume_index {volume_index} given, but the image holds one volume (shape "
                             f"{shape})")
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise UserInputError(f"{path}: a 2D image (shape {shape}); expected a 3D volume with at least 2 voxels "
                             f"per axis")
    index = (slice(None),) * 3 + ((volume_index,) if extra else ()) + (0,) * (len(shape) - 3 - len(extra))
    return shape[:3], index


def _check_voxel_sizes(path: str, image) -> None:
    """A NIfTI's pixdim must be finite and positive. nibabel "fixes" the header it loads (0 becomes 1 mm, a negative
    size its absolute value), so the sizes are read again from the file as written."""
    try:
        with nib.openers.ImageOpener(path) as handle:
            header = type(image.header).from_fileobj(handle, check=False)
    except Exception:  # noqa: BLE001 - nibabel read this header a moment ago; keep its reading
        header = image.header
    sizes = [float(v) for v in np.asarray(header["pixdim"], dtype=np.float64)[1:4]]
    if not all(math.isfinite(v) and v > 0 for v in sizes):
        raise UserInputError(f"{path}: voxel size (pixdim) {sizes} in the header is zero, negative or not a number; "
                             f"fix the header")


def _check_stored_size(path: str, header, shape: tuple[int, ...]) -> None:
    """Refuse a header declaring more data than the file can hold, before allocating for it (a cut or forged file
    would otherwise take the declared size in memory before the read fails)."""
    dtype = np.dtype(header.get_data_dtype())
    data_bytes = float(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    offset = float(header["vox_offset"]) if "vox_offset" in header else 0.0
    stored = os.path.getsize(path) * (MAX_DEFLATE_RATIO if path.endswith(".gz") else 1)
    if offset + data_bytes > stored:
        raise UserInputError(f"{path}: truncated or corrupt image data (the header declares shape {shape} of "
                             f"{dtype}, {_bytes_text(data_bytes)}, more than the file can hold)")


def _read_nifti(path: str, volume_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises ImageFileError, OSError, EOFError... for non-images
        raise UserInputError(f"{path}: not a readable NIfTI image ({one_line(error)})") from None
    dtype = np.dtype(image.get_data_dtype())
    if dtype.kind not in "biuf":  # complex, RGB (structured) or text data is no MR magnitude image
        raise UserInputError(f"{path}: expected a grey-scale image of real numbers, got data type {dtype}")
    # every header check before the data is read: nothing is allocated for a file that is refused
    shape, index = _volume_slicer(path, tuple(int(n) for n in image.shape), volume_index)
    _check_voxel_sizes(path, image)
    _check_affine(path, np.asarray(image.affine, dtype=np.float64))
    check_memory(INPUT_COPIES * 4 * float(np.prod(shape)), f"{path} (shape {shape})")
    _check_stored_size(path, image.header, tuple(int(n) for n in image.shape))
    try:
        array = np.asarray(image.dataobj[index], dtype=np.float32)
    except (EOFError, zlib.error, OSError, ValueError) as error:  # a cut .nii.gz fails only while decompressing
        raise UserInputError(f"{path}: truncated or corrupt image data ({one_line(error)})") from None
    return array.reshape(shape), np.asarray(image.affine, dtype=np.float64)


def _read_dicom_series(folder: str, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import itk

    names_generator = itk.GDCMSeriesFileNames.New(Directory=folder)
    series = list(names_generator.GetSeriesUIDs())
    if not series:
        raise UserInputError(f"{folder}: no DICOM series found in this directory")
    if len(series) > 1:  # the largest series is usually the scan, smaller ones localisers
        notes.append(f"{folder}: {len(series)} DICOM series found, read the one with the most files")
    files = max((list(names_generator.GetFileNames(uid)) for uid in series), key=len)
    check_memory(INPUT_COPIES * 4 * _dicom_voxel_count(files), f"{folder} ({len(files)} DICOM files)")
    try:
        image = itk.imread(files, itk.F)
    except Exception as error:  # ITK raises RuntimeError with a long C++ message
        raise UserInputError(f"{folder}: unreadable DICOM series ({one_line(error)})") from None
    array = itk.array_from_image(image).transpose(2, 1, 0)  # ITK's numpy view is (z, y, x); keep index (i, j, k)
    if array.ndim != 3 or min(array.shape) < 2:
        raise UserInputError(f"{folder}: a 2D image (shape {array.shape}); expected a 3D series of at least 2 "
                             f"slices")
    direction = np.asarray(image.GetDirection(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return np.ascontiguousarray(array, dtype=np.float32), _LPS_TO_RAS @ affine


def _dicom_voxel_count(files: list[str]) -> float:
    """Voxels a series holds, from its first file's header (all slices of a series share rows and columns)."""
    import pydicom

    try:
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        frames = int(getattr(header, "NumberOfFrames", 1) or 1)
        return float(int(header.Rows) * int(header.Columns) * frames * len(files))
    except Exception:  # noqa: BLE001 - an unreadable header is reported by ITK's read right after
        return 0.0


def _check_affine(path: str, affine: np.ndarray) -> None:
    linear = affine[:3, :3]
    finite = bool(np.all(np.isfinite(affine)))
    singular_values = np.linalg.svd(linear, compute_uv=False) if finite else None
    if not finite or singular_values.min() <= 1e-6 * singular_values.max():
        raise UserInputError(f"{path}: non-invertible voxel-to-world affine (zero or non-finite voxel size "
                             f"or collinear axes): {np.round(linear, 4).tolist()}")


def _check_values(volume: Volume, nan_policy: str) -> None:
    finite = np.isfinite(volume.array)
    bad = int(finite.size - np.count_nonzero(finite))
    if bad:
        if nan_policy == "refuse":
            raise UserInputError(f"{volume.path}: {bad} NaN/Inf voxels; fix the file, or set them to 0 with "
                                 f"--nan_policy repair")
        volume.array[~finite] = 0.0
        volume.warnings.append(f"{volume.path}: {bad} NaN/Inf voxels were set to 0")
    low, high = float(volume.array.min()), float(volume.array.max())
    if low == high:
        raise UserInputError(f"{volume.path}: a constant image (every voxel is {low}); expected an MR volume")


# This tool's temporary names: .tmp-<writer's process id>-<8 hex>-<final name> (before 0.6.0 without the process id).
_TEMPORARY = re.compile(r"^\.tmp-(?:(\d+)-)?[0-9a-f]{8}-.+")
# A temporary file whose writer is unknown (an old name) is stale once untouched this long.
STALE_TEMPORARY_SECONDS = 3600


def _temporary_name(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{os.path.basename(path)}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporary files a killed run of this tool left in ``folder``: those whose writing process is gone,
    and old-style ones untouched for ``STALE_TEMPORARY_SECONDS``. A live writer's files are kept. Returns them."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.match(name)
        if match is None:
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            pid = match.group(1)
            stale = (not _process_alive(int(pid))) if pid else (
                time.time() - os.path.getmtime(path) > STALE_TEMPORARY_SECONDS)
            if stale and os.path.isfile(path):
                os.remove(path)
                removed.append(path)
    return removed


def _publish(temporary: str, path: str) -> None:
    with open(temporary, "rb") as written:  # flush to disk before the rename makes it visible
        os.fsync(written.fileno())
    os.replace(temporary, path)


def _sync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):  # make the renames themselves durable (not possible on every platform)
        folder_handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(folder_handle)
        finally:
            os.close(folder_handle)


@contextlib.contextmanager
def atomic_paths(paths: list[str]):
    """Yield a temporary name beside each of ``paths`` (same extension) to write to; on success they replace
    ``paths`` in the given order (the last one marks the set complete), on any failure none does."""
    temporaries = [_temporary_name(path) for path in paths]
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        yield temporaries
        for temporary, path in zip(temporaries, paths):
            if os.path.exists(temporary):  # a file the caller chose not to write stays as it was
                _publish(temporary, path)
        for folder in dict.fromkeys(os.path.dirname(os.path.abspath(path)) for path in paths):
            _sync_folder(folder)
    finally:
        for temporary in temporaries:
            if os.path.exists(temporary):
                os.remove(temporary)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary name beside ``path`` (same extension) to write to; it replaces ``path`` on success only."""
    with atomic_paths([path]) as (temporary,):
        yield temporary


def write_nifti_file(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """Write a float32 NIfTI with ``affine`` as both sform and qform (scanner space, mm) to ``path`` as it is (the
    caller's temporary name)."""
    image = nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """``write_nifti_file``, atomically."""
    with atomic_path(path) as temporary:
        write_nifti_file(array, affine, temporary)
