"""Milliseconds per 3D convolution of the synthesis network, by the kernel path PyTorch takes for it.

    python bench/conv_paths.py [--device cpu|cuda] [--threads 1] [--precision fp32|bf16] [--output FILE.json]

Each of the network's convolution kinds (``SHAPES``: the encoder's 3x3x3 at 16 and 64 channels, the fusion block's
depth-wise 3x3x3, the decoder's projection) runs on windows of a few sizes, the small ones being what the inference
engine's cut windows at the head's edge look like, by every path available on the device:
- ``conv3d_cl``: ``F.conv3d`` on channels-last input and weights (what the network runs);
- ``conv3d_cf``: ``F.conv3d`` on channels-first (contiguous) input and weights;
- ``onednn_cl``: ``aten.mkldnn_convolution`` on channels-last tensors (CPU): oneDNN whatever the size, where
  ``F.conv3d`` of batch 1 takes PyTorch's reference kernel when batch x channels x depth x height <= 20480;
- ``conv3d_cl_benchmark``: ``conv3d_cl`` with ``torch.backends.cudnn.benchmark`` (GPU).
Median of ``--repeats`` calls after a warm-up, in ``inference_mode``; prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, in channels, out channels, groups): the small scale's and the paper scale's convolutions.
SHAPES = [("encoder 16", 16, 16, 1), ("encoder 64", 64, 64, 1), ("depthwise 64", 64, 64, 64),
          ("depthwise 512", 512, 512, 512), ("projection 17->64", 17, 64, 1), ("projection 64->256", 64, 256, 1)]
WINDOWS = [(64, 64, 64), (53, 49, 57), (31, 38, 41), (20, 24, 60)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "conv_paths.json"))
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    last = torch.channels_last_3d

    def timed(call) -> float:
        call()
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return round(1000 * statistics.median(times), 3)

    rows = []
    with torch.inference_mode():
        for name, channels_in, channels_out, groups in SHAPES:
            weight = torch.randn(channels_out, channels_in // groups, 3, 3, 3, device=device, dtype=dtype)
            bias = torch.randn(channels_out, device=device, dtype=dtype)
            for window in WINDOWS:
                image = torch.randn(1, channels_in, *window, device=device, dtype=dtype)
                image_cl, weight_cl = image.contiguous(memory_format=last), weight.contiguous(memory_format=last)
                paths = {"conv3d_cl": lambda: F.conv3d(image_cl, weight_cl, bias, padding=1, groups=groups),
                         "conv3d_cf": lambda: F.conv3d(image, weight, bias, padding=1, groups=groups)}
                if device.type == "cpu":
                    paths["onednn_cl"] = lambda: torch.ops.aten.mkldnn_convolution(
                        image_cl, weight_cl, bias, [1, 1, 1], [1, 1, 1], [1, 1, 1], groups)
                row = {"conv": name, "window": list(window)}
                for path, call in paths.items():
                    row[path] = timed(call)
                if device.type == "cuda":
                    torch.backends.cudnn.benchmark = True
                    row["conv3d_cl_benchmark"] = timed(paths["conv3d_cl"])
                    torch.backends.cudnn.benchmark = False
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".tmp", "w") as handle:
        json.dump({"device": args.device, "threads": args.threads, "precision": args.precision,
                   "processor": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "rows": rows}, handle, indent=2)
    os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main()
