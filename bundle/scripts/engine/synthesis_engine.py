"""The synthesis engine: a scan's latent features window by window, decoded once per output voxel.

``synthesize_volume``: the encoder runs on overlapping input windows whose latent features are blended with
Gaussian weights (no seams), and the LIIF decoder is queried for every output voxel exactly once. Windows are
processed row by row along the first axis and only a slab of blended latents (one window row plus a halo) is
kept: latent channels x (roi_size[0] + 5) x H x W floats (about 0.7 GB for the small network on a 218 x 182 mm
plane with the default 64-voxel windows), plus ``query_chunk`` queries at a time and the predictions of the output
rows one window row completes, whatever the number of slices.
Where time goes (bench/README.md): the encoder. So windows are shrunk to tile each axis evenly, windows only
background reads are skipped, and (``crop_margin``) the others are cut to the head they see; windows are encoded
within ``FastConvolutions`` (the kernel measured fastest per convolution); the slab is stored channels-last, the
layout the decoder gathers codes from fastest; on an output grid equal to the input's each output voxel is decoded
from its own latent code (``LIIFDecoder.query_latent_centres``) instead of 8.

``TUMSynInferer``: the MONAI ``Inferer`` that holds the engine's settings (``configs/inference.yaml``'s
``inferer``) and runs it on a batch of normalised volumes, optionally averaging the predictions of its 8 mirror
images (``flip_averaging``, the one test-time option).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from ..errors import UserInputError, config_flag, config_null
from ..nets.layout import is_channels_last
from ..nets.liif import LIIFDecoder, make_coord
from ..prompt import MODALITIES, Prompt, tokenize

# Latent voxels kept around the ones a query reads: the decoder reads the 2 latent voxels around a coordinate per
# axis and the latent is a 3x3x3 convolution of the features, so 2 voxels of margin make slab edges invisible.
QUERY_HALO = 2
# The 8 mirror images of a volume: every subset of its 3 axes flipped (test-time augmentation by mirroring, as
# nnU-Net does: Isensee et al., Nature Methods 2021).
MIRROR_AXES = tuple(axes for count in range(4) for axes in itertools.combinations(range(3), count))


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
    source: torch.Tensor | None = None,
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

    ``image [1, D, H, W]`` is normalised; ``tokens [1, L]`` (or ``modality [1]``) is the target condition, ``source
    [1]`` the input's contrast as a modality index (None: unknown; ``TUMSynNet.embed_condition``). Output
    voxel j of n along an axis of n_in input voxels sits at normalised coordinate -1 + (2j + 1) / n. Runs on the
    network's device and returns float32 on the CPU. ``network``: what ``TUMSynNet`` offers (``embed_condition``
    once per volume, ``encode`` per window, ``query``; on the input grid, ``decoder.query_latent_centres`` when its
    ``decoder`` is a ``LIIFDecoder``).

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
    # On the input grid every output voxel is a latent voxel: its own code decodes it, the 7 other corners weigh 0.
    decoder = getattr(network, "decoder", None)
    centres = decoder if out_shape == in_shape and isinstance(decoder, LIIFDecoder) else None
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
                                            None if modality is None else modality.to(device),
                                            None if source is None else source.to(device))
        for index, z in enumerate(starts[0]):
            boxes = [_read_box(mask_array, (z, y, x), roi, in_shape, out_shape, crop_margin) for y, x in windows]
            read = [((z, y, x), box) for (y, x), box in zip(windows, boxes) if box is not None]
            for batch_start in range(0, len(read), sw_batch_size):
                batch = read[batch_start : batch_start + sw_batch_size]
                # Boxes of one size are encoded together (cut windows may differ in size).
                for _, group in itertools.groupby(batch, key=lambda item: [high - low for low, high in item[1]]):
                    group = list(group)
                    crops = torch.stack([image[(slice(None), *_slices(box))] for _, box in group])
                    with FastConvolutions():
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
                                 None if flat_mask is None else flat_mask[rows], centres)
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
        # decoder gathers without a transposing copy (scripts.nets.liif).
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
                 query_chunk: int, mask: torch.Tensor | None = None, centres: LIIFDecoder | None = None) -> None:
    """Query output rows ``[first, stop)`` from the latent slab that starts at input row ``slab_low``; with a
    ``mask`` (flat, bool, like ``destination``) only its voxels, the others are set to 0. ``centres``: the output
    grid is the input grid, decoded by this decoder's ``query_latent_centres``."""
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
        if centres is not None:  # output voxel = latent voxel, at the same flat index past the slab's first rows
            prediction = centres.query_latent_centres(latent[None], (flat + (first - slab_low) * plane_size)[None])
        else:
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

    The network then keeps its feature maps channels-last too (``scripts.nets.layout``; CUDA does so by itself), the
    layout in which oneDNN runs the fusion block's depth-wise convolution 5x faster.
    """
    for module in network.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return network


class FastConvolutions(TorchFunctionMode):
    """A context in which ``F.conv3d`` (what ``nn.Conv3d`` calls) runs on the kernel measured fastest for the
    network's shapes (``bench/conv_paths.py``, bench/README.md), with ``F.conv3d``'s results; ``synthesize_volume``
    encodes its windows within it, so the network stays plain PyTorch:
    - on a CPU (float32, no autocast), always oneDNN. For batch 1, PyTorch picks its reference kernel instead when
      batch x channels x depth x height <= 20480 (a heuristic made for small 2D images): windows cut at the head's
      edge then ran 10-16x slower per voxel at 16 channels, and the U-Net's coarse levels always take it;
    - on a GPU, a grouped (depth-wise) convolution on channels-first tensors, whatever the input's layout, and the
      input's layout back: cuDNN's channels-last grouped kernel took 6-10x longer (an H100, fp32 and bf16).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return (_routed_conv3d if func is F.conv3d else func)(*args, **(kwargs or {}))


def _routed_conv3d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                   dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv3d`` on the kernel ``FastConvolutions`` chooses."""
    if groups > 1 and input.is_cuda and is_channels_last(input):
        output = F.conv3d(input.contiguous(), weight.contiguous(), bias, stride, padding, dilation, groups)
        return output.contiguous(memory_format=torch.channels_last_3d)
    # Under CPU autocast F.conv3d computes in the autocast dtype: leave that to it, as a padding given by name.
    if (input.device.type == "cpu" and input.dtype == torch.float32 and not isinstance(padding, str)
            and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.is_available()):
        return torch.ops.aten.mkldnn_convolution(input, weight, bias, _triple(padding), _triple(stride),
                                                 _triple(dilation), groups)
    return F.conv3d(input, weight, bias, stride, padding, dilation, groups)


def _triple(value: int | Sequence[int]) -> list[int]:
    return [value] * 3 if isinstance(value, int) else list(value)


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


def _mirror_axes(flip_averaging: bool | str) -> tuple[tuple[int, ...], ...]:
    return MIRROR_AXES if config_flag(flip_averaging, "flip_averaging") else ((),)


def _mirrored(volume: torch.Tensor, axes: Sequence[int], first_axis: int = 0) -> torch.Tensor:
    """``volume`` flipped along the spatial ``axes`` (0-2), counted from dimension ``first_axis``."""
    return volume.flip([first_axis + axis for axis in axes]) if axes else volume


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
    ``flip_averaging`` (optional, off by default): the prediction is the mean of the network's predictions on the
    volume's 8 mirror images (``MIRROR_AXES``), each flipped back: 8x the time.
    The input is normalised by ``scripts.engine.inference_engine.synthesize_image`` (``INPUT_NORMALISATION``).
    """

    def __init__(self, prompt: str | None = None, roi_size: Sequence[int] = (64, 64, 64), overlap: float = 0.25,
                 sigma_scale: float = 0.125, sw_batch_size: int = 1, query_chunk: int = 4096, amp: bool = True,
                 progress: bool = True, skip_background: bool = True, crop_margin: int | None = None,
                 fit_windows: bool = True, channels_last: bool = True, flip_averaging: bool = False):
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
        self.mirror_axes = _mirror_axes(flip_averaging)

    def with_options(self, flip_averaging: bool | str | None = None) -> TUMSynInferer:
        """A copy of these settings with ``flip_averaging`` as given here (None: as these settings have it)."""
        inferer = copy.copy(self)
        if flip_averaging is not None:
            inferer.mirror_axes = _mirror_axes(flip_averaging)
        return inferer

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, prompt: str | Prompt | None = None,
                 out_shape: Sequence[int] | None = None, source_modality: str | None = None) -> torch.Tensor:
        """``source_modality``: the input's contrast, the network's ``source`` (None: unknown)."""
        prompt = prompt if prompt is not None else self.prompt
        tokens = modality = None
        if prompt is not None:
            prompt = prompt if isinstance(prompt, Prompt) else Prompt.parse(prompt)
            tokens = tokenize(prompt.render())
            modality = torch.tensor([MODALITIES.index(prompt.modality)])
        out_shape = tuple(inputs.shape[2:]) if out_shape is None else tuple(out_shape)
        if self.channels_last:
            channels_last_convolutions(network)
        source = None if source_modality is None else torch.tensor([MODALITIES.index(source_modality)])
        return torch.stack([self._prediction(network, item, tokens, modality, source, out_shape) for item in inputs])

    def _prediction(self, network: torch.nn.Module, image: torch.Tensor, tokens: torch.Tensor | None,
                    modality: torch.Tensor | None, source: torch.Tensor | None,
                    out_shape: tuple[int, ...]) -> torch.Tensor:
        """The prediction of ``image [1, D, H, W]``, averaged over ``self.mirror_axes``. The output grid's voxels sit
        symmetrically in the field of view, so flipping the input and the prediction along an axis keeps every
        voxel's position."""
        decode_mask = foreground_mask(image, out_shape) if self.skip_background else None
        total = None
        for axes in self.mirror_axes:
            mask = None if decode_mask is None else _mirrored(decode_mask, axes)
            prediction = synthesize_volume(network, _mirrored(image, axes, 1), tokens, out_shape, modality=modality,
                                           source=source, decode_mask=mask, **self.settings)
            prediction = _mirrored(prediction, axes, 1)
            total = prediction if total is None else total.add_(prediction)
        return total.div_(len(self.mirror_axes))  # in place: no second output-sized tensor
