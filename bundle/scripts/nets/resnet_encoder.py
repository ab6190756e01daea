"""Stage-2 image encoder: a 3D ResNet-34 layout with every stride 1, so features keep the input's resolution.

The TUMSyn paper uses "a modified ResNet-34 without downsampling"; the LIIF decoder then reads one latent code per
input voxel. Two departures from the classification ResNet (He et al., CVPR 2016), both as in EDSR (Lim et al.,
CVPRW 2017), the standard for super-resolution encoders:
- no batch normalisation: it rescales intensities per batch, and training patches and whole-volume inference
  would see different statistics;
- residual branches scaled by 0.1, which keeps a deep normalisation-free stack stable at initialisation.
"""

from typing import Optional, Sequence

import torch
from torch import nn

from .layout import is_channels_last

RESIDUAL_SCALE = 0.1  # EDSR's residual scaling (Lim et al. 2017, Sec. 3.2)


class BasicBlock3d(nn.Module):
    """ResNet BasicBlock (two 3x3x3 convolutions) at stride 1, with a scaled residual branch."""

    def __init__(self, channels: int):
        super().__init__()
        self.residual_scale = RESIDUAL_SCALE
        self.residual = nn.Sequential(
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual_scale * self.residual(x)


class ResNetEncoder3d(nn.Module):
    """``[B, in_channels, D, H, W] -> [B, channels, D, H, W]``: stem convolution, ResNet stages, long skip.

    ``blocks`` is the number of BasicBlocks per stage ((3, 4, 6, 3) is ResNet-34); all stages share ``channels``
    since nothing is downsampled.
    """

    def __init__(self, in_channels: int, channels: int, blocks: Sequence[int]):
        super().__init__()
        if channels < 1 or not blocks or min(blocks) < 1:
            raise ValueError(f"encoder: expected channels >= 1 and blocks >= 1 per stage, got {channels}, {blocks}")
        self.out_channels = channels
        self.stem = nn.Conv3d(in_channels, channels, kernel_size=3, padding=1)
        stages = [nn.Sequential(*[BasicBlock3d(channels) for _ in range(count)]) for count in blocks]
        self.body = nn.Sequential(*stages, nn.Conv3d(channels, channels, kernel_size=3, padding=1))

    def forward(self, image: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``condition`` is unused: the paper fuses the prompt after the encoder (``scripts.nets.tumsyn_net``)."""
        stem = self.stem(image)
        if is_channels_last(self.body[-1].weight):  # a one-channel image gives the stem no layout to follow
            stem = stem.contiguous(memory_format=torch.channels_last_3d)
        return stem + self.body(stem)
