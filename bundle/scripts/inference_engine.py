"""Whole-volume inference: any scan + a target prompt -> the requested contrast at the requested voxel size.

Engine (``synthesize_volume``): the encoder runs on overlapping input windows whose latent features are blended
with Gaussian weights (no seams), and the LIIF decoder is queried for every output voxel exactly once. Windows are
processed row by row along the first axis and only a slab of blended latents (one window row plus a halo) is
kept: latent channels x (roi_size[0] + 5) x H x W floats (about 0.7 GB for the small network on a 218 x 182 mm
plane with the default 64-voxel windows), plus ``query_chunk`` queries at a time and the predictions of the output
rows one window row completes, whatever the number of slices.
Where time goes (bench/README.md): the encoder. So windows are shrunk to tile each axis evenly, windows only
background reads are skipped, and (``crop_margin``) the others are cut to the head they see; the slab is stored
channels-last, the layout the decoder gathers codes from fastest.

Geometry (``output_grid``): the output tiles the input's field of view at the target voxel size (rounded so the
FOV edges coincide), keeps the input's orientation and direction cosines (oblique stays oblique), and the network
sees every input in the closest RAS+ voxel order, as it saw its training data.

Driver (``run_inference``, ``run_batch``, ``SynthesisRunner`` for ``configs/inference.yaml``): loads and checks the
input, resolves the prompts, writes ``<stem>_<modality>.nii.gz``, a PNG preview and a JSON sidecar (last, so a
sidecar marks a finished case), each atomically.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import itertools
import json
import logging
import math
import os
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from tqdm import tqdm

import scripts

from .errors import UserInputError, config_null, guard_text_fields, one_line
from .intensity import METHODS as INTENSITY_METHODS
from .intensity import normalize_intensity
from .liif import make_coord
from .ood import ood_warnings
from .preview import save_preview
from .prompt import MODALITIES, Prompt, PromptError, canonical_modality, prompt_from_image, tokenize
from .volume_io import Volume, atomic_path, check_memory, load_volume, save_nifti

logger = logging.getLogger(__name__)

# Latent voxels kept around the ones a query reads: the decoder reads the 2 latent voxels around a coordinate per
# axis and the latent is a 3x3x3 convolution of the features, so 2 voxels of margin make slab edges invisible.
QUERY_HALO = 2

# Bytes per output voxel held at once: the float32 prediction, its resampled mask and a copy on write.
OUTPUT_BYTES_PER_VOXEL = 12

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


def _reorder_shape(shape: Sequence[int], orientation: np.ndarray) -> tuple[int, ...]:
    reordered = [0, 0, 0]
    for axis, (target_axis, _) in enumerate(orientation):
        reordered[int(target_axis)] = int(shape[axis])
    return tuple(reordered)


def _from_canonical(array: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    ras = nib.orientations.axcodes2ornt("RAS")
    return nib.orientations.apply_orientation(array, nib.orientations.ornt_transform(ras, orientation))


# ---------------------------------------------------------------------------------------------------------------
# Engine


def _window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start indices of windows of ``window`` voxels covering ``size`` with at least ``overlap`` between neighbours."""
    if window >= size:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    count = math.ceil((size - window) / stride) + 1
    return sorted({min(i * stride, size - window) for i in range(count)})


def _fitted_windows(size: int, largest: int, overlap: float) -> tuple[int, list[int]]:
    """The smallest window (at most ``largest``) and its evenly spaced starts that cover ``size`` with as many
    windows as ``_window_starts`` places at ``largest``, neighbours sharing at least ``overlap`` of a window.

    ``_window_starts`` clamps its last window to the end, where it overlaps its neighbour more than needed; equal
    smaller windows cover the same axis with less encoding (1.29 instead of 1.86 times the demo head's volume at
    64 voxels and 0.1 overlap; bench/README.md).
    """
    count = len(_window_starts(size, largest, overlap))
    if count == 1:
        return min(largest, size), [0]
    window = next((w for w in range(math.ceil(size / count), largest + 1)
                   if count * w - (count - 1) * math.ceil(overlap * w) >= size), None)
    if window is None:  # windows so small that their stride is 1 voxel: nothing to shrink
        return largest, _window_starts(size, largest, overlap)
    return window, [round(i * (size - window) / (count - 1)) for i in range(count)]


def gaussian_window(size: Sequence[int], sigma_scale: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Separable Gaussian blending weights over a window (sigma = ``sigma_scale`` x size per axis), never zero.

    Unlike ``monai.data.utils.compute_importance_map`` it is not clamped from below: that clamp makes all windows
    weigh the same near their corners, where zero-padding artefacts live, and lets those artefacts through.
    """
    weight = torch.ones((), device=device)
    for n in size:
        offset = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        weight = weight[..., None] * torch.exp(-0.5 * (offset / (sigma_scale * n)) ** 2)
    return weight


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast on a GPU that has it (fp16 otherwise) when ``amp``; full precision on the CPU."""
    if not amp or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def synthesize_volume(
    network: torch.nn.Module,
    image: torch.Tensor,
    tokens: torch.Tensor | None,
    out_shape: Sequence[int],
    *,
    modality: torch.Tensor | None = None,
    roi_size: Sequence[int] = (64, 64, 64),
    overlap: float = 0.25,
    sigma_scale: float = 0.125,
    sw_batch_size: int = 1,
    query_chunk: int = 4096,
    amp: bool = True,
    progress: bool = True,
    decode_mask: torch.Tensor | None = None,
    crop_margin: int | None = None,
    fit_windows: bool = True,
) -> torch.Tensor:
    """The network's prediction on a grid of ``out_shape`` tiling the field of view of ``image``: ``[1, *out_shape]``.

    ``image [1, D, H, W]`` is normalised; ``tokens [1, L]`` (or ``modality [1]``) is the target condition. Output
    voxel j of n along an axis of n_in input voxels sits at normalised coordinate -1 + (2j + 1) / n. Runs on the
    network's device and returns float32 on the CPU. ``network``: what ``TUMSynNet`` offers (``embed_condition``
    once per volume, ``encode`` per window, ``query``).

    ``decode_mask`` (bool, ``out_shape``; e.g. ``foreground_mask``): only its voxels are decoded, the rest are 0,
    and windows no such voxel reads are not encoded. Every decoded voxel equals the unmasked result (a query reads
    only its own corner latents, and a skipped window adds nothing to them).

    ``fit_windows``: ``roi_size`` is the largest window; each axis gets the smallest equal windows that tile it
    with as many windows as ``roi_size`` would (``_fitted_windows``). False: windows of ``roi_size``, the last one
    clamped to the end of the axis.

    ``crop_margin`` (with a ``decode_mask``): the windows tile only the box of the latents the masked-in voxels
    read, plus that many input voxels of context, and each window is cut to the same box of its own voxels, so
    background far from the head is not encoded either (a head padded into a wider field of view costs nothing
    more). Unlike skipping whole windows this changes the decoded values (the encoder's zero padding moves, and the
    fusion attention pools over the cut window); bench/README.md measures the quality. None: whole windows.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image: expected shape [1, D, H, W], got {list(image.shape)}")
    device = next(network.parameters()).device
    # One copy to the device: a window cut from a CPU image would be copied on its own, and a copy from pageable
    # memory makes the CPU wait for the GPU's queue, so no window's launches would overlap the previous one's work.
    image = image.to(device)
    in_shape, out_shape = tuple(image.shape[1:]), tuple(int(n) for n in out_shape)
    if decode_mask is not None and tuple(decode_mask.shape) != out_shape:
        raise ValueError(f"decode_mask: expected shape {list(out_shape)} (the output grid), "
                         f"got {list(decode_mask.shape)}")
    decode_mask = None if decode_mask is None else decode_mask.to("cpu", torch.bool)
    mask_array = None if decode_mask is None else decode_mask.numpy()  # for _read_box (host work, NumPy's speed)
    span = [(0, n) for n in in_shape]  # the input range the windows tile, per axis
    if decode_mask is not None and crop_margin is not None:  # the box every cut window lies in: tile only that
        span = _read_box(mask_array, (0, 0, 0), in_shape, in_shape, out_shape, crop_margin) or span
    lengths = [high - low for low, high in span]
    roi = tuple(n if int(r) <= 0 else min(int(r), n) for r, n in zip(roi_size, lengths))  # <= 0: the whole axis
    if fit_windows:
        roi, starts = zip(*[_fitted_windows(n, r, overlap) for n, r in zip(lengths, roi)])
    else:
        starts = [_window_starts(n, r, overlap) for n, r in zip(lengths, roi)]
    starts = [[low + start for start in axis] for (low, _), axis in zip(span, starts)]
    window_weight = gaussian_window(roi, sigma_scale, device)

    # Output row j (first axis) reads latent rows around its continuous input index u_j.
    rows_ratio = in_shape[0] / out_shape[0]
    first_latent_row = np.floor((np.arange(out_shape[0]) + 0.5) * rows_ratio - 0.5).astype(int)
    plane_coords = make_coord(out_shape[1:]).to(device)  # [H' * W', 2], shared by every output row
    plane_size = plane_coords.shape[0]
    output = torch.empty(out_shape, dtype=torch.float32)
    flat_mask = None if decode_mask is None else decode_mask.reshape(-1)

    windows = [(y, x) for y in starts[1] for x in starts[2]]
    bar = tqdm(total=len(starts[0]) * len(windows), desc="synthesize", unit="window", disable=not progress)
    slab = None
    slab_low = starts[0][0]  # first input row still needed; the slab starts there once a window is encoded
    next_row = 0
    with torch.inference_mode(), _autocast(device, amp):
        # One embedding of the prompt for every window (on a GPU the text tower's launches cost more than its sums).
        condition = network.embed_condition(None if tokens is None else tokens.to(device),
                                            None if modality is None else modality.to(device))
        for index, z in enumerate(starts[0]):
            boxes = [_read_box(mask_array, (z, y, x), roi, in_shape, out_shape, crop_margin) for y, x in windows]
            read = [((z, y, x), box) for (y, x), box in zip(windows, boxes) if box is not None]
            for batch_start in range(0, len(read), sw_batch_size):
                batch = read[batch_start : batch_start + sw_batch_size]
                # Boxes of one size are encoded together (cut windows may differ in size).
                for _, group in itertools.groupby(batch, key=lambda item: [high - low for low, high in item[1]]):
                    group = list(group)
                    crops = torch.stack([image[(slice(None), *_slices(box))] for _, box in group])
                    encoded = network.encode(crops, condition=condition).float()
                    if slab is None:
                        slab = _LatentSlab(encoded.shape[1], roi[0] + 2 * QUERY_HALO + 1, in_shape[1:], device,
                                           slab_low)
                    for (corner, box), latent in zip(group, encoded):
                        weight = window_weight[_slices([(low - c, high - c) for (low, high), c in zip(box, corner)])]
                        slab.add(latent * weight, weight, *(low for low, _ in box))
                bar.update(len(batch))
            bar.update(len(windows) - len(read))
            # Rows below the next window row are final; decode every output row whose reads lie in them.
            final_high = starts[0][index + 1] if index + 1 < len(starts[0]) else in_shape[0]
            last_row = next_row
            while last_row < out_shape[0] and (
                final_high == in_shape[0] or first_latent_row[last_row] + 1 + QUERY_HALO < final_high
            ):
                last_row += 1
            if last_row > next_row:
                rows = slice(next_row * plane_size, last_row * plane_size)
                destination = output.view(-1)[rows]
                if slab is None:  # no window read so far: no voxel of these rows is decoded
                    destination.zero_()
                else:
                    _decode_rows(network, slab.blended(final_high), slab.low, rows_ratio, next_row, last_row,
                                 plane_coords, out_shape, destination, query_chunk,
                                 None if flat_mask is None else flat_mask[rows])
                next_row = last_row
            if next_row < out_shape[0]:  # forget the rows no later output row reads
                slab_low = max(slab_low, min(max(int(first_latent_row[next_row]) - QUERY_HALO, 0), final_high))
                if slab is not None:
                    slab.drop_below(slab_low)
    bar.close()
    return output.unsqueeze(0)


class _LatentSlab:
    """Gaussian-weighted sums of window latents over input rows ``[low, high)`` (all columns), in a buffer of fixed
    capacity allocated once, so peak memory is channels x capacity x H x W whatever the number of slices."""

    def __init__(self, channels: int, capacity: int, plane: Sequence[int], device: torch.device, low: int = 0):
        # Channels-last storage seen as [channels, rows, H, W]: each latent code is one contiguous row, which the
        # decoder gathers without a transposing copy (scripts.liif).
        self.sums = torch.zeros((capacity, *plane, channels), device=device).permute(3, 0, 1, 2)
        self.weights = torch.zeros((1, capacity, *plane), device=device)
        self.low = self.high = low  # input rows held
        self.blended_high = low  # rows below it already hold sums / weights

    def add(self, weighted_latent: torch.Tensor, weight: torch.Tensor, z: int, y: int, x: int) -> None:
        depth, height, width = weight.shape
        if z + depth - self.low > self.sums.shape[1]:
            raise RuntimeError(f"latent slab overflow: rows {self.low}..{z + depth} exceed {self.sums.shape[1]}")
        self.high = max(self.high, z + depth)
        rows = slice(z - self.low, z - self.low + depth)
        self.sums[:, rows, y : y + height, x : x + width] += weighted_latent
        self.weights[:, rows, y : y + height, x : x + width] += weight

    def blended(self, final_high: int) -> torch.Tensor:
        """The blended latent of rows ``[low, final_high)``, which no later window touches (normalised in place)."""
        begin, end = self.blended_high - self.low, final_high - self.low
        # Latents no window covered (skipped windows: no decoded voxel reads them) become 0 rather than 0 / 0 = NaN,
        # which a zero-weight corner would still carry into a prediction (NaN x 0). Covered latents weigh ~1e-11 or
        # more at the default sigma_scale, so the clamp leaves them unchanged.
        self.sums[:, begin:end] /= self.weights[:, begin:end].clamp(min=1e-30)
        self.blended_high = final_high
        return self.sums[:, :end]

    def drop_below(self, row: int) -> None:
        """Forget rows below ``row``: shift the kept rows to the buffer start and clear the rest."""
        shift, keep = row - self.low, self.high - row
        if shift <= 0:
            return
        for begin in range(0, keep, shift):  # blocks of at most `shift` rows never overlap their source
            count = min(shift, keep - begin)
            for buffer in (self.sums, self.weights):
                buffer[:, begin : begin + count] = buffer[:, shift + begin : shift + begin + count]
        for buffer in (self.sums, self.weights):
            buffer[:, max(keep, 0) :] = 0
        self.low, self.high = row, max(self.high, row)


def _decode_rows(network, latent: torch.Tensor, slab_low: int, rows_ratio: float, first: int, stop: int,
                 plane_coords: torch.Tensor, out_shape: tuple[int, ...], destination: torch.Tensor,
                 query_chunk: int, mask: torch.Tensor | None = None) -> None:
    """Query output rows ``[first, stop)`` from the latent slab that starts at input row ``slab_low``; with a
    ``mask`` (flat, bool, like ``destination``) only its voxels, the others are set to 0."""
    device, slab_rows, plane_size = latent.device, latent.shape[1], plane_coords.shape[0]
    # Cell in the slab's normalised unit: along the first axis one output row spans rows_ratio input rows.
    cell = torch.tensor([2 * rows_ratio / slab_rows, 2 / out_shape[1], 2 / out_shape[2]], device=device)
    if mask is None:
        selected, total = None, (stop - first) * plane_size
    else:
        destination.zero_()
        selected = torch.nonzero(mask).squeeze(1)
        total = selected.numel()
    # Predictions stay on the device until the last chunk: one copy back per call, as each copy waits for the GPU.
    predictions = torch.empty(total, dtype=torch.float32, device=device)
    selected_on_device = None if selected is None else selected.to(device)
    for begin in range(0, total, query_chunk):
        end = min(begin + query_chunk, total)
        flat = (torch.arange(begin, end, device=device) if selected is None else selected_on_device[begin:end])
        rows = first + torch.div(flat, plane_size, rounding_mode="floor")
        input_row = (rows.double() + 0.5) * rows_ratio - 0.5  # continuous input index of each output row
        row_coord = (-1 + 2 * (input_row - slab_low + 0.5) / slab_rows).float()
        coords = torch.cat([row_coord[:, None], plane_coords[flat % plane_size]], dim=1)[None]
        # The chunk is already query_chunk points: one pass (the network's own default chunk may be smaller).
        prediction = network.query(latent[None], coords, cell.expand_as(coords), chunk_size=query_chunk)
        predictions[begin:end] = prediction.reshape(-1)
    if selected is None:
        destination.copy_(predictions)
    else:
        destination[selected] = predictions.cpu()


def _slices(box: Sequence[tuple[int, int]]) -> tuple[slice, ...]:
    return tuple(slice(low, high) for low, high in box)


def _read_box(decode_mask: np.ndarray | torch.Tensor | None, corner: Sequence[int], roi: Sequence[int],
              in_shape: Sequence[int], out_shape: Sequence[int], margin: int | None = None
              ) -> list[tuple[int, int]] | None:
    """The part of the window at ``corner`` (input index) of size ``roi`` to encode: ``[(low, high)]`` input indices
    per axis, or None when no masked-in output voxel reads it (no mask: every voxel is masked in).

    Output voxel j reads the latents at floor(u) and floor(u) + 1 around its input index u = (j + 0.5) r - 0.5
    (r = input / output voxels), so those with s - 1 <= u < s + size read the window [s, s + size); the ranges
    below take every j with s - 2 <= u <= s + size + 1 (a voxel of margin for rounding). ``margin`` None: the whole
    window; an int: only the latents the masked-in voxels read (again with a voxel for rounding), widened by
    ``margin`` voxels, within the window. ``decode_mask`` a NumPy array (or a CPU tensor): on a GPU the engine's
    call waits on this host work, and NumPy's reductions over a window's mask ran 4x faster than torch's.
    """
    window = [(start, start + size) for start, size in zip(corner, roi)]
    if decode_mask is None:
        return window
    region, ratios = [], [n_in / n_out for n_in, n_out in zip(in_shape, out_shape)]
    for start, size, n_out, ratio in zip(corner, roi, out_shape, ratios):
        low = max(math.ceil((start - 1.5) / ratio - 0.5), 0)
        high = min(math.floor((start + size + 1.5) / ratio - 0.5) + 1, n_out)
        region.append(slice(low, high))
    read = np.asarray(decode_mask)[tuple(region)]
    if margin is None:
        return window if read.any() else None
    plane_read = read.any(axis=2)  # the masked-in voxels' rows and columns, from one pass over the region
    used_per_axis = (plane_read.any(axis=1), plane_read.any(axis=0), read.any(axis=(0, 1)))
    if not used_per_axis[0].any():
        return None
    box = []
    for axis, ((start, stop), ratio) in enumerate(zip(window, ratios)):
        used = np.flatnonzero(used_per_axis[axis])
        first, last = region[axis].start + int(used[0]), region[axis].start + int(used[-1])
        low = math.floor((first + 0.5) * ratio - 0.5) - 1 - margin
        high = math.floor((last + 0.5) * ratio - 0.5) + 3 + margin
        if min(stop, high) <= max(start, low):  # its voxels read only the neighbouring window's latents
            return None
        box.append((max(start, low), min(stop, high)))
    return box


def channels_last_convolutions(network: torch.nn.Module) -> torch.nn.Module:
    """Store every ``Conv3d`` weight of ``network`` channels-last (in place, values unchanged); returns it.

    The network then keeps its feature maps channels-last too (``scripts.layout``; CUDA does so by itself), the
    layout in which oneDNN runs the fusion block's depth-wise convolution 5x faster.
    """
    for module in network.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return network


def foreground_mask(image: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
    """Output voxels inside the input's non-zero region: its mask, trilinearly resampled to ``out_shape``, >= 0.5.

    The rule by which the synthesized image is set to 0 outside the head, so decoding only these voxels
    (``synthesize_volume(decode_mask=...)``) changes nothing that is written.
    """
    nonzero = image[0] != 0
    if tuple(nonzero.shape) == tuple(int(n) for n in out_shape):  # the same grid: resampling is the identity
        return nonzero
    resampled = F.interpolate(nonzero[None, None].float(), size=tuple(out_shape), mode="trilinear",
                              align_corners=False)
    return resampled[0, 0] >= 0.5


class TUMSynInferer(Inferer):
    """MONAI ``Inferer`` around ``synthesize_volume``: ``inferer(inputs [B, 1, D, H, W], network, prompt, out_shape)``.

    Holds the engine settings; ``prompt`` (the official template or a Prompt) defaults to the one given here.
    ``roi_size``: encoder window in input voxels, a size <= 0 meaning the whole axis (as in MONAI's sliding window).
    ``skip_background``: decode only ``foreground_mask`` voxels (0 elsewhere, as ``synthesize_image`` writes them).
    ``fit_windows``: shrink the windows to tile each axis evenly (``synthesize_volume``).
    ``crop_margin`` (with ``skip_background``): cut each window to the box its foreground voxels read plus this
    many voxels (``synthesize_volume``); None: whole windows.
    ``channels_last``: put the network's 3D convolution weights in channels-last layout (same values) before the
    run, so oneDNN runs them without layout reorders (bench/README.md).
    ``input_normalisation``: how ``synthesize_image`` scales the input (``scripts.intensity.METHODS``): the default
    ``percentile`` is what the shipped weights were trained with; ``landmarks`` maps the input's percentiles onto
    the training images' of its modality (opt-in: measured on a real case in docs/real_data.md).
    """

    def __init__(self, prompt: str | None = None, roi_size: Sequence[int] = (64, 64, 64), overlap: float = 0.25,
                 sigma_scale: float = 0.125, sw_batch_size: int = 1, query_chunk: int = 4096, amp: bool = True,
                 progress: bool = True, skip_background: bool = True, crop_margin: int | None = None,
                 fit_windows: bool = True, channels_last: bool = True, input_normalisation: str = "percentile"):
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap: expected a fraction in [0, 1), got {overlap!r}")
        crop_margin = config_null(crop_margin)  # --crop_margin null: whole windows
        if crop_margin is not None and (not str(crop_margin).isdigit() or not skip_background):
            raise UserInputError(f"crop_margin: expected null or a number of voxels >= 0 with skip_background, got "
                                 f"{crop_margin!r} (skip_background={skip_background!r})")
        if len(roi_size) != 3 or query_chunk < 1 or sw_batch_size < 1:
            raise ValueError(f"roi_size, query_chunk, sw_batch_size: expected 3 window sizes (<= 0: whole axis) and "
                             f"positive sizes, got {list(roi_size)}, {query_chunk}, {sw_batch_size}")
        self.prompt = prompt
        self.settings = dict(roi_size=tuple(int(r) for r in roi_size), overlap=float(overlap),
                             sigma_scale=float(sigma_scale), sw_batch_size=int(sw_batch_size),
                             query_chunk=int(query_chunk), amp=bool(amp), progress=bool(progress),
                             crop_margin=None if crop_margin is None else int(crop_margin),
                             fit_windows=bool(fit_windows))
        self.skip_background, self.channels_last = bool(skip_background), bool(channels_last)
        if input_normalisation not in INTENSITY_METHODS:
            raise UserInputError(f"input_normalisation: expected one of {list(INTENSITY_METHODS)}, got "
                                 f"{input_normalisation!r}")
        self.input_normalisation = input_normalisation

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, prompt: str | Prompt | None = None,
                 out_shape: Sequence[int] | None = None) -> torch.Tensor:
        prompt = prompt if prompt is not None else self.prompt
        tokens = modality = None
        if prompt is not None:
            prompt = prompt if isinstance(prompt, Prompt) else Prompt.parse(prompt)
            tokens = tokenize(prompt.render())
            modality = torch.tensor([MODALITIES.index(prompt.modality)])
        out_shape = tuple(inputs.shape[2:]) if out_shape is None else tuple(out_shape)
        if self.channels_last:
            channels_last_convolutions(network)
        return torch.stack([synthesize_volume(network, item, tokens, out_shape, modality=modality,
                                              decode_mask=foreground_mask(item, out_shape) if self.skip_background
                                              else None, **self.settings)
                            for item in inputs])


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
    ``source_modality`` (the input's contrast) is needed by the ``landmarks`` input normalisation only."""
    if inferer.input_normalisation == "landmarks" and source_modality is None:
        raise UserInputError(f"{volume.path}: input_normalisation 'landmarks' needs the input's modality, and its "
                             f"metadata (BIDS name or sidecar, DICOM header) does not give it")
    spacing = target.voxel_size if spacing is None else spacing
    out_shape, out_affine = output_grid(volume.array.shape, volume.affine, spacing)
    check_memory(OUTPUT_BYTES_PER_VOXEL * float(np.prod(out_shape)), f"output grid {out_shape} for {volume.path}")
    orientation = _canonical_orientation(volume.affine)
    canonical = nib.orientations.apply_orientation(volume.array, orientation)
    normalised = normalize_intensity(canonical, method=inferer.input_normalisation, modality=source_modality)
    image = torch.from_numpy(np.ascontiguousarray(normalised))[None]
    logger.info("%s -> %s grid %s", volume.path, target.render(), out_shape)
    prediction = inferer(image[None], network, prompt=target, out_shape=_reorder_shape(out_shape, orientation))[0, 0]
    # Background stays background: zero where the input's non-zero mask, resampled to the output grid, is off.
    prediction = (prediction.clamp_(min=0) * foreground_mask(image, prediction.shape)).numpy()
    return np.ascontiguousarray(_from_canonical(prediction, orientation), dtype=np.float32), out_affine


def run_inference(input_image: str, prompt: str, output_dir: str, network: torch.nn.Module,
                  target_spacing: Sequence[float] | float | None = None, reference: str | None = None, *,
                  inferer: TUMSynInferer | None = None, volume_index: int | None = None,
                  nan_policy: str = "refuse", preview: bool = True) -> dict[str, str]:
    """Synthesise one case and write its image, preview and sidecar; returns their paths.

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
    target = target_prompt(prompt, source, volume.spacing, spacing)
    tokenize(target.render())  # checks the token limit before any work
    paths = output_paths(input_image, target.modality, output_dir)
    _refuse_overwriting_inputs(paths, [str(input_image), reference])
    out_of_distribution = ood_warnings(volume, target)  # warnings, not refusals (scripts/ood.py)

    # The grid follows the requested numbers, not the prompt's rounding of them (which may round tiny sizes to 0).
    grid_spacing = spacing if spacing is not None else _checked_spacing(target.voxel_size, "prompt 'Voxel size'")
    synthesized, out_affine = synthesize_image(volume, target, network, inferer, grid_spacing,
                                               None if source is None else source.modality)
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
        "input_spacing": list(volume.spacing),
        "target_spacing": list(target.voxel_size),
        "output_spacing": [float(s) for s in np.linalg.norm(out_affine[:3, :3], axis=0)],
        "output_shape": list(synthesized.shape),
        "reference": None if reference is None else os.path.abspath(reference),
        "model_version": bundle_version(),
        "intensity": INTENSITY_NOTES[inferer.input_normalisation],
        "warnings": volume.warnings,
        "ood_warnings": out_of_distribution,
    }
    with atomic_path(paths["sidecar"]) as temporary, open(temporary, "w") as handle:
        json.dump(record, handle, indent=2)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Many cases


CASE_KEYS = ("input_image", "prompt", "target_spacing", "reference")


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
                    datalist: str | None, dataset_dir: str) -> list[dict[str, Any]]:
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
    return [{"input_image": image, "prompt": prompt, "target_spacing": target_spacing, "reference": reference}]


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
                                      case.get("target_spacing"), case.get("reference"), **options))
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
