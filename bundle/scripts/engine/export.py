"""ONNX export of the stage-2 synthesis network (``network_def`` of configs/inference.yaml), image input alone.

The exported graph takes one encoder window ``image [1, 1, D, H, W]`` and returns the synthesized window on the same
grid with the network's default prompt (what ``verify_net_in_out`` also checks); the window size is fixed at export
time. TorchScript needs nothing of this module: ``python -m monai.bundle ckpt_export --net_id network_def ...``.

The network is plain PyTorch, so it exports as it is: ``torch.export.export(network, (image,))`` works too (tests).
The TorchScript-based ONNX exporter (``dynamo=False``) is used because the dynamo one needs ``onnxscript``, which
the bundle does not install.

    python -m scripts.engine.export --output model.onnx [--ckpt_path models/model.pt] [--scale small] [--size 64 64 64]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from .. import BUNDLE_ROOT

ONNX_OPSET = 20  # >= 17 for LayerNormalization; 20 is fully supported by onnxruntime 1.32


def export_onnx(network: nn.Module, path: str, window: tuple[int, int, int] = (64, 64, 64)) -> str:
    """Write ``network`` (image input alone, one ``window``-sized patch) to ``path`` as ONNX, atomically."""
    if len(window) != 3 or min(window) < 2:
        raise ValueError(f"window: expected three sizes >= 2 (voxels), got {window!r}")
    image = torch.zeros(1, 1, *(int(s) for s in window))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    training = network.training
    try:
        with torch.no_grad():
            torch.onnx.export(network.eval(), (image,), temporary, dynamo=False, input_names=["image"],
                              output_names=["pred"], opset_version=ONNX_OPSET)
    finally:
        network.train(training)
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
