"""3D Local Implicit Image Function decoder (LIIF; Chen, Liu and Wang, CVPR 2021), reimplemented from the paper.

An intensity at a continuous coordinate x is decoded from the latent codes around it:
- feature unfolding: each latent code is the concatenation of its 3x3x3 neighbourhood (paper Sec. 3.2);
- local ensemble: the 8 latent codes whose voxel centres surround x each predict the intensity from
  (code, x - centre, cell); predictions are averaged with weights equal to the volume of the box spanned by x and
  the *opposite* corner (Sec. 3.3), i.e. trilinear weights, so the output is continuous across voxel borders.
  The weights are computed per axis: equal to the box volumes between centres, and still exact (no division by a
  near-zero volume sum) for queries just outside the outermost centres;
- cell decoding: the size of the output voxel is an MLP input (Sec. 3.4), so one model serves any output spacing;
- optional input residual (not in LIIF): each corner's prediction is a correction added to the input intensity at
  that corner, so the ensemble adds the trilinearly interpolated input to the decoded correction: a global residual
  as super-resolution networks use (Kim, Lee and Lee, VDSR, CVPR 2016), written in LIIF's local-ensemble form.

Efficiency: the MLP's first layer is linear in its input [unfolded code, offset, cell], and unfolding followed
by a linear map is exactly a 3x3x3 convolution with zero padding. ``LIIFDecoder.project`` applies that
convolution once per volume, so a query only gathers one ``hidden[0]``-vector per corner instead of 27 codes. On an
output grid equal to the latent's every query sits on a latent centre, where one corner has all the weight:
``LIIFDecoder.query_latent_centres`` decodes only that code, and the inference engine calls it for such grids.

Coordinates: normalised to [-1, 1] per axis of the tensor's (D, H, W) order, voxel centres at -1 + (2i + 1) / n
(``align_corners=False``); ``cell`` is the output voxel size in the same unit.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .layout import cat_channels
from .text_guidance import piecewise_linear

# The 8 corners of the latent cube around a query, as binary (lower 0 / upper 1) offsets per axis.
_CORNER_OFFSETS = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)])


def make_coord(shape: List[int], ranges: Optional[List[List[float]]] = None, flatten: bool = True) -> torch.Tensor:
    """Voxel-centre coordinates of a grid of ``shape``: ``[prod(shape), 3]`` (or ``[*shape, 3]`` unflattened).

    ``ranges`` gives (low, high) edges per axis, default (-1, 1); centres are at low + (2i + 1)(high - low) / (2n).
    """
    axes: List[torch.Tensor] = []
    for axis, size in enumerate(shape):
        low, high = -1.0, 1.0
        if ranges is not None:
            low, high = float(ranges[axis][0]), float(ranges[axis][1])
        half_voxel = (high - low) / (2 * size)
        axes.append(low + half_voxel + 2 * half_voxel * torch.arange(size, dtype=torch.float32))
    grid = torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1)
    if flatten:
        return grid.reshape(-1, grid.shape[-1])
    return grid


def _gather_codes(latent: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The codes of ``latent [B, width, D, H, W]`` at flat voxel indices ``index [B, M]``: ``[B, M, width]``, rows
    contiguous, so the MLP runs on contiguous rows (~2x faster than strided, measured)."""
    batch, width = latent.shape[0], latent.shape[1]
    rows = latent.permute(0, 2, 3, 4, 1)
    if rows.is_contiguous():  # channels-last latent (the inference engine's slab): one row copy per code
        voxels = rows.shape[1] * rows.shape[2] * rows.shape[3]
        batch_offset = torch.arange(batch, device=index.device).unsqueeze(1) * voxels
        return rows.reshape(batch * voxels, width).index_select(0, (index + batch_offset).reshape(-1)).view(
            batch, -1, width)
    codes = torch.gather(latent.flatten(2), 2, index.unsqueeze(1).expand(-1, width, -1))  # [B, width, M]
    return codes.transpose(1, 2).contiguous()


class LIIFDecoder(nn.Module):
    """``project(features [B, C, D, H, W]) -> latent``, then ``query(latent, coords [B, N, 3], cell [B, N, 3])``.

    ``query`` returns ``[B, N, 1]`` intensities; ``query_in_chunks`` does the same with bounded memory;
    ``query_latent_centres`` decodes the latent's own voxel centres from one code each. With
    ``input_residual``, ``project`` also takes the input image and keeps it as the latent's last channel, which
    ``query`` adds to the MLP's output instead of feeding it to the MLP.
    """

    def __init__(self, in_channels: int, hidden: Sequence[int], input_residual: bool = False):
        super().__init__()
        if not hidden:
            raise ValueError("decoder: expected at least one hidden layer size")
        # First MLP layer, split: its unfolded-feature part as a convolution, its (offset, cell) part as a linear map.
        self.unfold_projection = nn.Conv3d(in_channels, hidden[0], kernel_size=3, padding=1)
        self.position_projection = nn.Linear(6, hidden[0], bias=False)
        layers: List[nn.Module] = []
        for width_in, width_out in zip(hidden, list(hidden[1:]) + [1]):
            # In place: every ReLU follows a linear map whose output nothing else keeps (one pass less over
            # [queries x corners x width] per layer; the gradients are the same).
            layers += [nn.ReLU(inplace=True), nn.Linear(width_in, width_out)]
        self.mlp = nn.Sequential(*layers)
        self.input_residual = input_residual
        self.register_buffer("corner_offsets", _CORNER_OFFSETS.clone(), persistent=False)

    def project(self, features: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Unfold + first linear layer for every latent code at once: ``[B, hidden[0], D, H, W]`` (``+ 1`` channel,
        the input ``image [B, 1, D, H, W]`` on the same grid, with ``input_residual``)."""
        latent = self.unfold_projection(features)
        if self.input_residual:
            if image is None:
                raise ValueError("image: required by a decoder with input_residual")
            latent = cat_channels(latent, image.to(latent.dtype))
        return latent

    def query(self, latent: torch.Tensor, coords: torch.Tensor, cell: torch.Tensor,
              modulation: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
              residual_curve: Optional[Tuple[torch.Tensor, float]] = None) -> torch.Tensor:
        """``[B, N, 1]`` intensities; with ``modulation``, a (scale, shift) pair ``[B, K, hidden[0]]`` applied to the
        codes of K targets (``scripts.nets.text_guidance.LatentModulation``), ``[B, N, K]``, and ``residual_curve``,
        (knots ``[B, K, n]``, their top intensity), the targets' grey-level curves of the input residual
        (``scripts.nets.text_guidance.piecewise_linear``)."""
        batch, width = latent.shape[0], latent.shape[1]
        size = torch.tensor(latent.shape[2:], dtype=coords.dtype, device=coords.device)
        # Continuous voxel index: latent centres sit at integers 0 .. n-1.
        position = (coords + 1) / 2 * size - 0.5
        # Ensemble weights: for each corner, the volume of the box between the query and the opposite corner, i.e.
        # per-axis linear weights. Beyond the outermost centres the query is clamped for the weights (LIIF clamps
        # coordinates likewise); the lower corner stops at n-2 so the upper one stays a distinct, inside centre.
        inside = torch.minimum(position.clamp(min=0), size - 1)
        lower = torch.minimum(inside.floor(), (size - 2).clamp(min=0))
        upper_fraction = inside - lower  # [B, N, 3]
        # Per-axis (lower, upper) weights multiplied out over the corners, in the order of _CORNER_OFFSETS.
        axis_weight = torch.stack([1 - upper_fraction, upper_fraction], dim=-1)  # [B, N, 3, 2]
        weight = (axis_weight[:, :, 0, :, None] * axis_weight[:, :, 1, None, :]).flatten(2)
        weight = (weight[..., None] * axis_weight[:, :, 2, None, :]).flatten(2)  # [B, N, 8]

        corners = torch.minimum(lower.long().unsqueeze(2) + self.corner_offsets, (size.long() - 1).view(1, 1, 1, 3))
        offset = position.unsqueeze(2) - corners.to(position.dtype)  # true offset in latent voxels, [B, N, 8, 3]
        cell_in_voxels = (cell * size / 2).unsqueeze(2).expand_as(offset)

        flat_index = (corners[..., 0] * latent.shape[3] + corners[..., 1]) * latent.shape[4] + corners[..., 2]
        codes = _gather_codes(latent, flat_index.reshape(batch, -1)).view(-1, width)  # [B * N * 8, width]
        hidden_width = width - int(self.input_residual)  # the input image, if kept, is the last channel
        position_input = torch.cat([offset, cell_in_voxels], dim=-1).view(-1, 6)
        # code + position_projection(offset, cell) in one pass; addmm reads the code columns in place (no copy).
        if modulation is None:
            hidden = torch.addmm(codes[:, :hidden_width], position_input, self.position_projection.weight.t())
            prediction = self.mlp(hidden).view(weight.shape)  # [B, N, 8]
            if self.input_residual:
                prediction = prediction + codes[:, -1].view(weight.shape)
            return (prediction * weight).sum(dim=-1, keepdim=True)
        # K targets of one encoding: [B, K, N x 8, hidden] rows, the codes modulated per target.
        scale, shift = modulation[0].unsqueeze(2), modulation[1].unsqueeze(2)
        points, corners_per_point = weight.shape[1], weight.shape[2]
        rows = codes[:, :hidden_width].view(batch, 1, -1, hidden_width)
        position = self.position_projection(position_input).view(batch, 1, -1, hidden_width)
        prediction = self.mlp(rows * scale + shift + position).view(batch, -1, points, corners_per_point)
        if self.input_residual:
            residual = codes[:, -1].view(batch, 1, points * corners_per_point)
            if residual_curve is not None:
                residual = piecewise_linear(residual_curve[0], residual, residual_curve[1])
            prediction = prediction + residual.view(batch, -1, points, corners_per_point)
        return (prediction * weight.unsqueeze(1)).sum(dim=-1).transpose(1, 2)  # [B, N, K]

    def query_latent_centres(self, latent: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``[B, M, 1]`` intensities at the centres of the latent voxels ``index [B, M]`` (flat indices into the
        latent's D x H x W) for output voxels the size of a latent voxel.

        What ``query`` gives there: at a centre one corner weighs 1 and the other 7 weigh 0, so only that code is
        decoded (offset 0, cell 1 latent voxel), with 8x fewer MLP rows. For an output grid equal to the latent's,
        which the caller knows (``scripts.engine.synthesis_engine``); coordinates computed for such a grid land up to
        a float32 rounding off the centres, where ``query`` decodes all 8 corners.
        """
        codes = _gather_codes(latent, index)  # [B, M, width]
        hidden_width = latent.shape[1] - int(self.input_residual)
        centre = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]], dtype=codes.dtype, device=codes.device)  # offset, cell
        prediction = self.mlp(codes[..., :hidden_width] + self.position_projection(centre))
        if self.input_residual:
            prediction = prediction + codes[..., -1:]
        return prediction

    def query_in_chunks(
        self, latent: torch.Tensor, coords: torch.Tensor, cell: torch.Tensor, chunk_size: int
    ) -> torch.Tensor:
        """``query`` over ``chunk_size`` points at a time, so memory is bounded by the chunk, not by N."""
        predictions = [
            self.query(latent, coords[:, start : start + chunk_size], cell[:, start : start + chunk_size])
            for start in range(0, coords.shape[1], chunk_size)
        ]
        return torch.cat(predictions, dim=1)
