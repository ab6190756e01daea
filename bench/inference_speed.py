"""Seconds and peak memory to synthesise one 1 mm whole-brain volume: the engine vs the official demo's loop.

    .venv/bin/python bench/inference_speed.py [--scales small paper] [--inputs 1mm 5mm] [--fov_scale 1.0]

Each (scale, input, method) case runs in its own subprocess, so its peak resident memory (``ru_maxrss``) is its
own; ``rss_start`` is the resident size after building the network (imports and weights), before synthesis.
Methods, on the same randomly initialised network and input:
- ``engine``: ``scripts.inference_engine.synthesize_volume`` (Gaussian-blended windows, each output voxel decoded once);
- ``demo``: the official demo's scheme: fixed 60^3 input crops (25 % overlap), each encoded and decoded on its own
  dense output grid, overlapping predictions averaged.
Prints a table and writes ``bench/results/inference_speed.json``. ``--fov_scale 0.5`` shrinks the volume per axis
(8x fewer voxels) for a quick run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "bundle"))

BRAIN_SHAPE_1MM = (182, 218, 182)  # MNI152 1 mm grid
INPUTS = {"1mm": (1.0, 1.0, 1.0), "5mm": (1.0, 1.0, 5.0)}  # the second: a 5 mm axial clinical scan
PROMPT = ("Age: 30; Gender: F; Scanner: 3.0 Siemens; Modality: T2w; Voxel size: (1.0, 1.0, 1.0); "
          "Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (4000.0, 100.0, None, 90.0)")
DEMO_CROP = 60  # the official demo's crop side (input voxels)


def synthetic_brain(shape, seed=0):
    """A smooth ellipsoidal 'brain' with a zero background, normalised like a real input."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(a**2 for a in axes) < 0.8
    texture = gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    return (inside * (0.6 + 0.2 * texture / texture.std())).clip(0).astype(np.float32)


def demo_crop_loop(network, image, tokens, out_shape, query_chunk, overlap=0.25):
    """The official demo's inference: every crop decoded on its own output grid, overlaps averaged."""
    import torch

    from scripts.inference_engine import _window_starts
    from scripts.liif import make_coord

    in_shape = image.shape[1:]
    ratio = [o / i for o, i in zip(out_shape, in_shape)]
    total, count = torch.zeros(out_shape), torch.zeros(out_shape)
    crop = [min(DEMO_CROP, n) for n in in_shape]
    starts = [_window_starts(n, c, overlap) for n, c in zip(in_shape, crop)]
    with torch.inference_mode():
        for z in starts[0]:
            for y in starts[1]:
                for x in starts[2]:
                    corner = (z, y, x)
                    latent = network.encode(image[None, :, z : z + crop[0], y : y + crop[1], x : x + crop[2]], tokens)
                    # Output voxels whose centres lie in the crop, on the crop's own coordinate grid.
                    low = [math.ceil(c * r - 0.5) for c, r in zip(corner, ratio)]
                    high = [math.ceil((c + n) * r - 0.5) for c, n, r in zip(corner, crop, ratio)]
                    size = [h - l for l, h in zip(low, high)]
                    ranges = [(-1 + 2 * ((l / r) - c) / n, -1 + 2 * ((h / r) - c) / n)
                              for l, h, r, c, n in zip(low, high, ratio, corner, crop)]
                    coords = make_coord(size, ranges)[None]
                    cell = torch.tensor([2 / (r * n) for r, n in zip(ratio, crop)]).expand_as(coords)
                    prediction = torch.cat([network.query(latent, coords[:, i : i + query_chunk],
                                                          cell[:, i : i + query_chunk])
                                            for i in range(0, coords.shape[1], query_chunk)], 1)
                    region = tuple(slice(l, h) for l, h in zip(low, high))
                    total[region] += prediction.reshape(size)
                    count[region] += 1
    return total / count


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(scale: str, input_name: str, method: str, fov_scale: float, roi: int, query_chunk: int) -> dict:
    import numpy as np
    import torch

    from scripts.inference_engine import output_grid, synthesize_volume
    from scripts.prompt import tokenize
    from scripts.tumsyn_net import build_tumsyn_net

    torch.set_num_threads(1)
    torch.manual_seed(0)
    spacing = INPUTS[input_name]
    fov_mm = [round(n * fov_scale) for n in BRAIN_SHAPE_1MM]
    in_shape = tuple(max(2, round(f / s)) for f, s in zip(fov_mm, spacing))
    out_shape, _ = output_grid(in_shape, np.diag([*spacing, 1.0]), (1.0, 1.0, 1.0))
    image = torch.from_numpy(synthetic_brain(in_shape))[None]
    network = build_tumsyn_net(scale).eval()
    tokens = tokenize(PROMPT)
    rss_start = resident_mb()
    start = time.perf_counter()
    if method == "engine":
        output = synthesize_volume(network, image, tokens, out_shape, roi_size=(roi,) * 3, query_chunk=query_chunk,
                                   progress=False)[0]
    else:
        output = demo_crop_loop(network, image, tokens, out_shape, query_chunk)
    seconds = time.perf_counter() - start
    return {"scale": scale, "input": input_name, "method": method, "input_shape": list(in_shape),
            "output_shape": list(output.shape), "seconds": round(seconds, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_start_mb": round(rss_start, 1), "roi": roi, "query_chunk": query_chunk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", nargs="+", default=["small", "paper"])
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS))
    parser.add_argument("--methods", nargs="+", default=["engine", "demo"])
    parser.add_argument("--fov_scale", type=float, default=1.0, help="field of view per axis, 1.0 = 182x218x182 mm")
    parser.add_argument("--roi", type=int, default=64)
    parser.add_argument("--query_chunk", type=int, default=65536)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "inference_speed.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case and print its JSON
    args = parser.parse_args()
    if args.case:
        scale, input_name, method = args.case.split(",")
        print(json.dumps(run_case(scale, input_name, method, args.fov_scale, args.roi, args.query_chunk)))
        return

    results = []
    for scale in args.scales:
        for input_name in args.inputs:
            for method in args.methods:
                command = [sys.executable, __file__, "--case", f"{scale},{input_name},{method}",
                           "--fov_scale", str(args.fov_scale), "--roi", str(args.roi),
                           "--query_chunk", str(args.query_chunk)]
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=True)
                    results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                except subprocess.TimeoutExpired:
                    results.append({"scale": scale, "input": input_name, "method": method, "seconds": None,
                                    "error": f"timed out after {args.timeout} s"})
                except subprocess.CalledProcessError as error:
                    results.append({"scale": scale, "input": input_name, "method": method, "seconds": None,
                                    "error": error.stderr.strip().splitlines()[-1]})
                print(json.dumps(results[-1]), flush=True)

    print(f"\n{'scale':6} {'input':5} {'method':6} {'output':>15} {'seconds':>8} {'peak MB':>8} {'start MB':>8} "
          f"{'demo/engine':>11}")
    for row in results:
        demo = next((r for r in results if r["method"] == "demo" and r["scale"] == row["scale"]
                     and r["input"] == row["input"] and r.get("seconds")), None)
        timed_engine = demo and row["method"] == "engine" and row.get("seconds")
        ratio = f"{demo['seconds'] / row['seconds']:.2f}x" if timed_engine else ""
        shape = "x".join(map(str, row.get("output_shape", [])))
        print(f"{row['scale']:6} {row['input']:5} {row['method']:6} {shape:>15} {str(row.get('seconds')):>8} "
              f"{str(row.get('peak_rss_mb', '')):>8} {str(row.get('rss_start_mb', '')):>8} {ratio:>11}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"fov_scale": args.fov_scale, "threads": 1, "cpu_count": os.cpu_count(), "cases": results},
                  handle, indent=2)


if __name__ == "__main__":
    main()
