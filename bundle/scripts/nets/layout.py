"""Memory layout of 3D feature maps: the network keeps them channels-last where its weights are.

oneDNN runs 3D convolutions on channels-last input several times faster than on channels-first (the fusion block's
depth-wise convolution 5x, bench/README.md), but on a CPU a convolution's output follows its input's layout, a
1x1x1 convolution returns channels-first whatever its input, and ``torch.cat`` beside a one-channel image returns
channels-first through a strided copy. CUDA picks channels-last by itself once the weights are
(``scripts.engine.synthesis_engine.channels_last_convolutions``).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


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


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (zero padding) routed to the fastest kernel measured for the network's shapes
    (``bench/conv_paths.py``); the weights and the results are those of ``nn.Conv3d``:
    - on a CPU (float32, no autocast), always oneDNN. For batch 1, PyTorch picks its reference kernel instead when
      batch x channels x depth x height <= 20480 (a heuristic made for small 2D images): the inference engine's
      windows cut at the head's edge at 16 channels then ran 10-16x slower per voxel;
    - on a GPU, a grouped (depth-wise) convolution on channels-first tensors, whatever the input's layout, and the
      input's layout back: cuDNN's channels-last grouped kernel took 6-10x longer (an H100, fp32 and bf16).
    Tracing (the ONNX export) takes ``F.conv3d`` as it is, and so does a TorchScript export on a CPU (its autocast
    state cannot be read there safely).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, groups=groups)
        self.onednn = torch.backends.mkldnn.is_available()

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if not torch.jit.is_tracing():
            if self.groups > 1 and input.is_cuda and is_channels_last(input):
                output = F.conv3d(input.contiguous(), weight.contiguous(), bias, self.stride, self.padding,
                                  self.dilation, self.groups)
                return output.contiguous(memory_format=torch.channels_last_3d)
            if not torch.jit.is_scripting():
                # Under CPU autocast nn.Conv3d computes in the autocast dtype: leave that to F.conv3d.
                if (self.onednn and input.device.type == "cpu" and input.dtype == torch.float32
                        and not torch.is_autocast_enabled("cpu")):
                    return torch.ops.aten.mkldnn_convolution(input, weight, bias, self.padding, self.stride,
                                                             self.dilation, self.groups)
        return F.conv3d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
