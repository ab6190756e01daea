"""Per-window costs of one network, extrapolated to a whole volume for both inference schemes (for scales too slow
to run whole on a CPU, e.g. the paper scale).

    .venv/bin/python bench/window_costs.py [--scale paper] [--threads 2] [--repeats 2]

Measures (median of ``--repeats``, fp32, random weights, convolutions channels-last) the seconds to encode one 64^3
window, one 60^3 demo crop, and to decode one voxel query on the input grid, then prices a 1 mm whole-brain volume
(182x218x182, the synthetic head of ``inference_speed.py``): the engine, tiled as ``configs/inference.yaml`` tiles
it (fitted windows, cut to the head), encodes its windows' voxels at the 64^3 window's cost per voxel and decodes
the foreground voxels; the demo encodes every 60^3 crop and decodes each crop's 60^3 grid.
Writes ``bench/results/window_costs_<scale>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bundle"))
sys.path.insert(0, HERE)


def seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import numpy as np
    import torch
    from inference_speed import BRAIN_SHAPE_1MM, DEMO_CROP, PROMPT, config_inferer, synthetic_brain

    from scripts.engine.synthesis_engine import (
        _fitted_windows,
        _read_box,
        _window_starts,
        channels_last_convolutions,
        foreground_mask,
    )
    from scripts.nets.liif import make_coord
    from scripts.nets.tumsyn_net import build_tumsyn_net
    from scripts.prompt import tokenize

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="paper")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--queries", type=int, default=65536)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    network, tokens = channels_last_convolutions(build_tumsyn_net(args.scale).eval()), tokenize(PROMPT)
    with torch.inference_mode():
        encode = {side: seconds(lambda: network.encode(torch.rand(1, 1, side, side, side), tokens), args.repeats)
                  for side in (64, DEMO_CROP)}
        latent = network.encode(torch.rand(1, 1, 64, 64, 64), tokens)
        coords = make_coord([64, 64, 64])[None, : args.queries]
        cell = torch.full_like(coords, 2 / 64)
        per_query = seconds(lambda: network.query(latent, coords, cell), args.repeats) / coords.shape[1]

    image = torch.from_numpy(synthetic_brain(BRAIN_SHAPE_1MM))[None]
    mask = foreground_mask(image, BRAIN_SHAPE_1MM)
    settings = config_inferer(args.scale, None).settings
    overlap = settings["overlap"]
    tiling = [_fitted_windows(n, r, overlap) if settings["fit_windows"] else (r, _window_starts(n, r, overlap))
              for n, r in zip(BRAIN_SHAPE_1MM, settings["roi_size"])]
    roi = [window for window, _ in tiling]
    boxes = [_read_box(mask, (z, y, x), roi, BRAIN_SHAPE_1MM, BRAIN_SHAPE_1MM, settings["crop_margin"])
             for z in tiling[0][1] for y in tiling[1][1] for x in tiling[2][1]]
    encoded = sum(int(np.prod([high - low for low, high in box])) for box in boxes if box is not None)
    read = sum(box is not None for box in boxes)
    crops = int(np.prod([len(_window_starts(n, DEMO_CROP, 0.25)) for n in BRAIN_SHAPE_1MM]))
    engine = encoded * encode[64] / 64**3 + int(mask.sum()) * per_query
    demo = crops * (encode[DEMO_CROP] + DEMO_CROP**3 * per_query)
    row = {"scale": args.scale, "threads": args.threads, "encode_64_s": round(encode[64], 2),
           "encode_60_s": round(encode[DEMO_CROP], 2), "query_us": round(per_query * 1e6, 2),
           "engine_windows_read": int(read), "engine_windows_total": len(boxes), "engine_voxels_encoded": encoded,
           "foreground_voxels": int(mask.sum()), "demo_crops": crops, "engine_estimate_s": round(engine, 1),
           "demo_estimate_s": round(demo, 1), "speedup_estimate": round(demo / engine, 2)}
    print(json.dumps(row, indent=1))
    output = os.path.join(HERE, "results", f"window_costs_{args.scale}.json")
    with open(output + ".tmp", "w") as handle:
        json.dump(row, handle, indent=2)
    os.replace(output + ".tmp", output)


if __name__ == "__main__":
    main()
