"""Memory layout of 3D feature maps: the encoder keeps them channels-last where its weights are.

oneDNN runs 3D convolutions on channels-last input several times faster than on channels-first (the fusion block's
depth-wise convolution 5x, bench/README.md), but on a CPU a convolution's output follows its input's layout, and
``torch.cat`` beside a one-channel image returns channels-first through a strided copy. CUDA picks channels-last by
itself once the weights are (``scripts.inference_engine.channels_last_convolutions``).
"""

import torch


def channels_last(weight: torch.Tensor) -> bool:
    """Whether a convolution's ``weight`` is stored channels-last (as ``channels_last_convolutions`` leaves it)."""
    return weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()


def cat_channels(features: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """``torch.cat([features, extra], dim=1)`` for ``[B, C, D, H, W]`` maps, channels-last when ``features`` is."""
    if not channels_last(features):
        return torch.cat([features, extra], dim=1)
    last = features.dim() - 1  # positive axes: the ONNX exporter writes a negative one into Transpose as is
    return torch.cat([features.movedim(1, last), extra.movedim(1, last)], dim=last).movedim(last, 1)
