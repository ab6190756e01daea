"""Memory layout of 3D feature maps: the network keeps them channels-last where its weights are.

oneDNN runs 3D convolutions on channels-last input several times faster than on channels-first (the fusion block's
depth-wise convolution 5x, bench/README.md), but on a CPU a convolution's output follows its input's layout, a
1x1x1 convolution returns channels-first whatever its input, and ``torch.cat`` beside a one-channel image returns
channels-first through a strided copy. CUDA picks channels-last by itself once the weights are
(``scripts.engine.synthesis_engine.channels_last_convolutions``).

The network's convolutions are plain ``nn.Conv3d``: which kernel runs them is the inference engine's choice
(``scripts.engine.synthesis_engine.FastConvolutions``), not the model's.
"""

from typing import Optional

import torch
import torch.nn.functional as F


def is_channels_last(tensor: torch.Tensor) -> bool:
    """Whether a ``[B, C, D, H, W]`` tensor (or a convolution's weight) is stored channels-last and not also
    channels-first, as a one-channel tensor is."""
    return tensor.is_contiguous(memory_format=torch.channels_last_3d) and not tensor.is_contiguous()


def cat_channels(features: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """``torch.cat([features, extra], dim=1)`` for ``[B, C, D, H, W]`` maps, channels-last when ``features`` is."""
    if not is_channels_last(features):
        return torch.cat([features, extra], dim=1)
    last = features.dim() - 1  # positive axes: the ONNX exporter writes a negative one into Transpose as is
    return torch.cat([features.movedim(1, last), extra.movedim(1, last)], dim=last).movedim(last, 1)


def pointwise(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A 1x1x1 convolution (its ``weight``, ``bias``) as one matrix product over the voxels:
    ``[B, C, *spatial] -> [B, C', *spatial]``, channels-last whatever the input's layout."""
    last = features.dim() - 1
    return F.linear(features.movedim(1, last), weight.flatten(1), bias).movedim(last, 1)
