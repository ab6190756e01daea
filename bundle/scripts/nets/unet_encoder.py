"""The small scale's stage-2 image encoder: a 3D U-Net whose output features keep the input's grid.

The paper's encoder (``scripts.nets.resnet_encoder``) never downsamples, so on a CPU budget (16 channels, 4 blocks) it
sees about 19 voxels around a voxel: 19 mm at the 1 mm grid users bring, less than a sulcus and its neighbours. Telling
CSF from white matter in a contrast that inverts them needs more context than that. A U-Net (Ronneberger et al.,
MICCAI 2015; in 3D Cicek et al., MICCAI 2016) reaches ~80 voxels at the same cost by working at 1/2, 1/4 and 1/8 of
the grid and bringing the result back to full resolution through skip connections, so the LIIF decoder still reads one
latent code per input voxel. The target prompt steers the coarsest level too (``bottleneck_fusion``), so the
features that travel back up already depend on the contrast asked for.

No normalisation layers, for the reason given in ``scripts.nets.resnet_encoder``; inputs whose size is not a multiple of
the total downsampling are zero-padded (the background of a skull-stripped scan) and the output cropped back.
"""

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

NEGATIVE_SLOPE = 0.1  # leaky ReLU: with no normalisation no unit can die for good


def conv_block(in_channels: int, out_channels: int, convs: int) -> nn.Sequential:
    """``convs`` 3x3x3 convolutions, each followed by a leaky ReLU (one U-Net level).

    He initialisation (He et al., ICCV 2015) for the leaky ReLU: with no normalisation layer PyTorch's default
    shrank the signal about 3x per level, to 1/30 of the input's scale at the bottleneck and a near-constant output
    at the start of training; on the copy task (1 mm, own contrast) it reached L1 0.040 after 50 steps against 0.059
    (bench/README.md, "The U-Net scale")."""
    layers = []
    for index in range(convs):
        conv = nn.Conv3d(in_channels if index == 0 else out_channels, out_channels, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, a=NEGATIVE_SLOPE, nonlinearity="leaky_relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)]
    return nn.Sequential(*layers)


class UNetEncoder3d(nn.Module):
    """``[B, in_channels, D, H, W] (+ condition [B, cond_dim]) -> [B, channels[0], D, H, W]``.

    ``channels`` are the widths per level, finest first; each level halves the grid (max pooling) and the way back
    doubles it (trilinear upsampling, concatenation with the level's skip, two convolutions). The full-resolution
    level has one convolution each way: it holds 8x the voxels of the next, and most of a CPU step went there.
    ``bottleneck_fusion``: a module ``(features, condition) -> features`` applied at the coarsest level (the
    prompt's cross-attention, ``scripts.nets.text_guidance.TextGuidedFusion``); None leaves the encoder unconditioned.
    ``condition_dim``, ``condition_channels``: the condition also enters with the image, projected to that many
    constant channels beside it, so every level computes features of the asked contrast. The bottleneck's gate
    alone steered too little at a CPU budget: asked for FLAIR, PD or T1w from a T1w, a model trained so returned
    the same image (bench/README.md, "The U-Net scale").
    """

    def __init__(self, in_channels: int, channels: Sequence[int], bottleneck_fusion: Optional[nn.Module] = None,
                 condition_dim: int = 0, condition_channels: int = 0):
        super().__init__()
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"encoder: expected >= 2 levels of >= 1 channels, got {channels}")
        self.out_channels = int(channels[0])
        self.multiple = 2 ** (len(channels) - 1)
        self.condition_projection = nn.Linear(condition_dim, condition_channels) if condition_channels else None
        widths_in = [in_channels + int(condition_channels), *channels[:-1]]
        self.down = nn.ModuleList(
            conv_block(c_in, c_out, 1 if level == 0 else 2)
            for level, (c_in, c_out) in enumerate(zip(widths_in, channels)))
        self.bottleneck_fusion = bottleneck_fusion
        coarse_to_fine = list(zip(channels[:0:-1], channels[-2::-1]))
        self.up = nn.ModuleList(
            conv_block(coarse + fine, fine, 1 if level == len(coarse_to_fine) - 1 else 2)
            for level, (coarse, fine) in enumerate(coarse_to_fine))

    def forward(self, image: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        depth, height, width = image.shape[2], image.shape[3], image.shape[4]
        x = image
        if self.condition_projection is not None:
            if condition is None:
                raise ValueError("condition: required by an encoder with condition_channels")
            constant = self.condition_projection(condition).to(image.dtype)[:, :, None, None, None]
            x = torch.cat([image, constant.expand(-1, -1, depth, height, width)], dim=1)
        x = F.pad(x, [0, (-width) % self.multiple, 0, (-height) % self.multiple, 0, (-depth) % self.multiple])
        skips: List[torch.Tensor] = []
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        if self.bottleneck_fusion is not None:
            if condition is None:
                raise ValueError("condition: required by an encoder with bottleneck_fusion")
            x = self.bottleneck_fusion(x, condition)
        for level, block in enumerate(self.up):
            skip = skips[len(skips) - 2 - level]
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return x[:, :, :depth, :height, :width]
