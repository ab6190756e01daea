"""What limits the small scale: the numbers behind the unet scale (bench/README.md, "The U-Net scale").

Measures, for the small network (shipped up to version 0.8; the paper's full-resolution ResNet layout at 16 channels
and one block per stage, with the fusion block after it) and the unet scale (scripts/nets/unet_encoder.py):
- trainable parameters and the receptive field: the extent of the input voxels whose change reaches one output
  latent code (the gradient of the centre code, non-zero), in voxels = mm at the 1 mm grid users bring; the LIIF
  query then reads the 2 latent codes around a point per axis (one voxel more);
- the training inputs: the share of samples whose input voxel is at most 1.25 mm on every axis (the grid users
  bring), and the field of view of a training input in mm at 1 mm, under the old and the new sampler settings.

    python bench/small_scale_diagnosis.py [--output bench/results/small_scale_diagnosis.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle"))

from scripts.nets import text_guidance  # noqa: E402
from scripts.nets.text_guidance import TextToVoxelAttention  # noqa: E402
from scripts.nets.tumsyn_net import build_tumsyn_net  # noqa: E402
from scripts.train.sr_patches import RandSRPatchesd  # noqa: E402

# Each scale's training-input settings (configs/stage2_train.yaml, `scales`).
SAMPLERS = {"small": {"lr_size": 16, "native_prob": 0.0}, "unet": {"lr_size": 32, "native_prob": 0.5}}


def receptive_field(net: torch.nn.Module, size: int = 160) -> int:
    """Voxels along one axis through which the input reaches the centre latent code (its gradient is non-zero).

    The fusion's attention pools every voxel into one per-channel gate by design (a global statistic, not local
    context), so its keys and values see the features detached here: what remains is the convolutional context."""
    attention_weights = {id(m.key_value.weight) for m in net.modules() if isinstance(m, TextToVoxelAttention)}
    original = text_guidance.pointwise
    text_guidance.pointwise = lambda f, w, b: original(f.detach() if id(w) in attention_weights else f, w, b)
    try:
        image = torch.rand(1, 1, size, size, size, requires_grad=True)
        latent = net.encode(image)
        centre = size // 2
        latent[0, :, centre, centre, centre].sum().backward()
    finally:
        text_guidance.pointwise = original
    reached = image.grad[0, 0].abs().amax(dim=(1, 2)) > 0
    return int(reached.sum())


def sampler_statistics(lr_size: int, native_prob: float, draws: int = 20000) -> dict:
    sampler = RandSRPatchesd(lr_size=(lr_size,) * 3, native_prob=native_prob)
    sampler.set_random_state(0)
    spacing = np.array([sampler.randomize((200, 200, 200)).spacing for _ in range(draws)])
    return {"share_at_most_1.25mm": float(np.mean(spacing.max(axis=1) <= 1.25)),
            "median_fov_mm": float(np.median(spacing * lr_size)),
            "fov_mm_at_1mm_input": lr_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    report = {}
    for scale, sampler in SAMPLERS.items():
        torch.manual_seed(0)
        net = build_tumsyn_net(scale)
        report[scale] = {
            "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "receptive_field_voxels": receptive_field(net),
            "training_inputs": sampler_statistics(**sampler),
        }
        print(scale, json.dumps(report[scale]), flush=True)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
