"""ONNX export of the stage-2 synthesis network (``network_def`` of configs/inference.yaml), image input alone.

The exported graph takes one encoder window ``image [1, 1, D, H, W]`` and returns the synthesized window on the same
grid with the network's default prompt (what ``verify_net_in_out`` also checks); the window size is fixed at export
time. TorchScript needs nothing of this module: ``python -m monai.bundle ckpt_export --net_id network_def ...``.

What blocks which exporter (torch 2.14.1, onnxruntime 1.32):
- ``torch.onnx.export(dynamo=True)`` (torch.export) fails in ``liif.LIIFDecoder.query``: it skips the corners no
  query weighs with ``torch.nonzero``, whose output length is data-dependent, and reshaping the codes by that
  length (``used.numel()``) raises a GuardOnDataDependentSymNode error. So the TorchScript-based exporter
  (``dynamo=False``) is used.
- The TorchScript-based exporter writes ``movedim(-1, 1)`` (``text_guidance.ChannelLayerNorm``) as an ONNX Transpose
  with a negative axis in ``perm``, which ONNX Runtime rejects ("Invalid attribute perm {0, -1, 1, 2, 3}"). The
  export therefore swaps those norms for ``_PermutedChannelNorm``: the same LayerNorm weights, positive axes only.

    python -m scripts.engine.export --output model.onnx [--ckpt_path models/model.pt] [--scale small] [--size 64 64 64]
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from torch import nn

from .. import BUNDLE_ROOT
from ..nets.text_guidance import ChannelLayerNorm

ONNX_OPSET = 20  # >= 17 for LayerNormalization; 20 is fully supported by onnxruntime 1.32


class _PermutedChannelNorm(nn.Module):
    """``ChannelLayerNorm`` with explicit non-negative permutations (see the module docstring)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.dim()
        channels_last = self.norm(x.permute(0, *range(2, n), 1))
        return channels_last.permute(0, n - 1, *range(1, n - 1))


def onnx_ready(network: nn.Module) -> nn.Module:
    """An eval-mode copy of ``network`` whose channel norms export to valid ONNX; ``network`` is left unchanged."""
    ready = copy.deepcopy(network).eval()
    for module in list(ready.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ChannelLayerNorm):
                setattr(module, name, _PermutedChannelNorm(child.norm))
    return ready


def export_onnx(network: nn.Module, path: str, window: tuple[int, int, int] = (64, 64, 64)) -> str:
    """Write ``network`` (image input alone, one ``window``-sized patch) to ``path`` as ONNX, atomically."""
    if len(window) != 3 or min(window) < 2:
        raise ValueError(f"window: expected three sizes >= 2 (voxels), got {window!r}")
    image = torch.zeros(1, 1, *(int(s) for s in window))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with torch.no_grad():
        torch.onnx.export(onnx_ready(network), (image,), temporary, dynamo=False, input_names=["image"],
                          output_names=["pred"], opset_version=ONNX_OPSET)
    os.replace(temporary, path)
    return path


def main(argv: list[str] | None = None) -> None:
    from ..nets.tumsyn_net import build_tumsyn_net
    from .inference_engine import load_network_weights

    parser = argparse.ArgumentParser(prog="python -m scripts.engine.export", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--ckpt_path", default=os.path.join(BUNDLE_ROOT, "models", "model.pt"))
    parser.add_argument("--scale", default="small", help="network scale of the checkpoint (small|paper)")
    parser.add_argument("--size", type=int, nargs=3, default=(64, 64, 64), help="window size D H W (voxels)")
    args = parser.parse_args(argv)
    network = build_tumsyn_net(args.scale, conditioning="text")
    load_network_weights(network, args.ckpt_path)
    print(export_onnx(network, args.output, tuple(args.size)))


if __name__ == "__main__":
    main()
