"""A/B of inference-engine settings on the 1 mm demo subject, side by side in one process, with the official loop.

    .venv/bin/python bench/engine_variants.py [--variants base cl slab64 ...] [--demo] [--threads 1]
                                              [--fov_scale 1.0] [--source subject|mni|real]
                                              [--output bench/results/engine_variants.json]

Every variant synthesizes the demo subject's T2w from its 1 mm T1w (``--source``: on which grid, or the real case,
as in ``inference_speed.py``) with the shipped weights (``models/model.pt``),
one after the other on the same network and input. Per variant: wall and process CPU seconds, the seconds spent
inside ``network.encode`` and ``network.query``, the windows encoded, peak resident memory (``VmHWM``, reset before
each variant), the PSNR against the subject's real T2w inside its head (``inference_speed.py``'s quality measure)
and the PSNR against the first variant's output. ``--demo`` adds the official demo's loop
(``inference_speed.demo_crop_loop``) on the same network, and each variant's speed-up over it.

A variant is a set of ``TUMSynInferer`` settings (``VARIANTS``) plus ``cpu_bf16`` (the run inside a CPU bf16
autocast, which the engine leaves on: its own autocast is for GPUs) and ``channels_last`` (the network's 3D
convolution weights in channels-last layout; the demo loop runs with the last variant's layout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bundle"))
sys.path.insert(0, HERE)

# The engine's previous settings (commit a551dcf: before the fitted and cut windows and the small query chunks).
HEAD_SETTINGS = dict(roi_size=(64, 64, 64), overlap=0.25, query_chunk=65536, channels_last=False, fit_windows=False)
NOW = {**HEAD_SETTINGS, "query_chunk": 4096, "channels_last": True}
VARIANTS = {
    "base": HEAD_SETTINGS,
    "chunk4096": {**HEAD_SETTINGS, "query_chunk": 4096},
    "cl": NOW,
    "cl_bf16": {**NOW, "cpu_bf16": True},
    "overlap10": {**NOW, "overlap": 0.1},
    "roi96": {**NOW, "roi_size": (96, 96, 96)},
    "slab64": {**NOW, "roi_size": (64, -1, -1)},
    "slab96": {**NOW, "roi_size": (96, -1, -1)},
    "slab80_ov10": {**NOW, "roi_size": (80, -1, -1), "overlap": 0.1},
    "fit_ov10": {**NOW, "overlap": 0.1, "fit_windows": True},
    "fit_ov10_crop4": {**NOW, "overlap": 0.1, "fit_windows": True, "crop_margin": 4},
    "fit_ov10_crop12": {**NOW, "overlap": 0.1, "fit_windows": True, "crop_margin": 12},
    "fit_ov25_crop4": {**NOW, "fit_windows": True, "crop_margin": 4},
    "fit_ov10_crop4_bf16": {**NOW, "overlap": 0.1, "fit_windows": True, "crop_margin": 4, "cpu_bf16": True},
    "fit_ov10_crop2": {**NOW, "overlap": 0.1, "fit_windows": True, "crop_margin": 2},
    "fit_ov10_crop0": {**NOW, "overlap": 0.1, "fit_windows": True, "crop_margin": 0},
    "fit128_ov10_crop0": {**NOW, "roi_size": (128, 128, 128), "overlap": 0.1, "fit_windows": True, "crop_margin": 0},
    "whole_crop0": {**NOW, "roi_size": (0, 0, 0), "fit_windows": True, "crop_margin": 0},  # one window: the head's box
    "fit_ov05_crop4": {**NOW, "overlap": 0.05, "fit_windows": True, "crop_margin": 4},
    "fit_ov05_crop2": {**NOW, "overlap": 0.05, "fit_windows": True, "crop_margin": 2},
    "fit_ov00_crop4": {**NOW, "overlap": 0.0, "fit_windows": True, "crop_margin": 4},
    "fit48_ov10_crop4": {**NOW, "roi_size": (48, 48, 48), "overlap": 0.1, "fit_windows": True, "crop_margin": 4},
    "fit40_ov10_crop4": {**NOW, "roi_size": (40, 40, 40), "overlap": 0.1, "fit_windows": True, "crop_margin": 4},
    "fit32_ov10_crop4": {**NOW, "roi_size": (32, 32, 32), "overlap": 0.1, "fit_windows": True, "crop_margin": 4},
    "fit96_ov10_crop4": {**NOW, "roi_size": (96, 96, 96), "overlap": 0.1, "fit_windows": True, "crop_margin": 4},
    "fit48_ov10_crop4_bf16": {**NOW, "roi_size": (48, 48, 48), "overlap": 0.1, "fit_windows": True,
                              "crop_margin": 4, "cpu_bf16": True},
}


class Timed:
    """Accumulates the process CPU seconds of a network's ``encode`` and ``query`` calls (wall seconds depend on
    the other jobs sharing the CPU) and counts the encoded windows."""

    def __init__(self, network):
        self.network, self.seconds, self.windows = network, {"encode": 0.0, "query": 0.0}, 0
        self.original = {name: getattr(network, name) for name in self.seconds}
        for name in self.seconds:
            setattr(network, name, self._timed(name))

    def _timed(self, name):
        def call(*args, **kwargs):
            start = time.process_time()
            result = self.original[name](*args, **kwargs)
            self.seconds[name] += time.process_time() - start
            if name == "encode":
                self.windows += args[0].shape[0]
            return result
        return call

    def restore(self):
        for name in self.original:
            delattr(self.network, name)  # the class's methods again


def set_convolution_layout(network, channels_last: bool) -> None:
    import torch

    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    for module in network.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=layout)


def main() -> None:
    import numpy as np
    import torch
    from inference_speed import PROMPT, _memory_mb, _reset_peak_memory, demo_crop_loop, load_case

    from scripts.engine.inference_engine import load_network_weights
    from scripts.engine.metrics import psnr
    from scripts.engine.synthesis_engine import TUMSynInferer, foreground_mask
    from scripts.nets.tumsyn_net import build_tumsyn_net
    from scripts.prompt import tokenize

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--demo", action="store_true", help="also run the official demo's loop")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fov_scale", type=float, default=1.0)
    parser.add_argument("--source", default="subject", choices=["subject", "mni", "real"],
                        help="the 1 mm input (inference_speed.load_case)")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "engine_variants.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    array, _, reference = load_case(args.source, "1mm", args.fov_scale)
    image = torch.from_numpy(np.ascontiguousarray(array))[None]
    weights = os.path.join(HERE, "..", "bundle", "models", "model.pt")
    network = load_network_weights(build_tumsyn_net("small"), weights)
    foreground, head = foreground_mask(image, array.shape).numpy(), reference > 0
    rows, outputs = [], {}
    runs = list(args.variants) + (["demo"] if args.demo else [])
    for name in runs:
        settings = dict(VARIANTS.get(name, {}))
        cpu_bf16, channels_last = settings.pop("cpu_bf16", False), settings.pop("channels_last", None)
        if channels_last is not None:
            set_convolution_layout(network, channels_last)
        timed = Timed(network)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16 else contextlib.nullcontext()
        _reset_peak_memory(torch.device("cpu"))
        wall, cpu = time.perf_counter(), time.process_time()
        with autocast:
            if name == "demo":
                output = demo_crop_loop(network, image, tokenize(PROMPT), array.shape, 4096)
            else:
                inferer = TUMSynInferer(progress=False, channels_last=bool(channels_last), **settings)
                output = inferer(image[None], network, prompt=PROMPT)[0, 0]
        row = {"variant": name, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in
                                             VARIANTS.get(name, {}).items()},
               "seconds": round(time.perf_counter() - wall, 2), "cpu_seconds": round(time.process_time() - cpu, 2),
               "encode_cpu_seconds": round(timed.seconds["encode"], 2),
               "query_cpu_seconds": round(timed.seconds["query"], 2),
               "windows": timed.windows, "peak_rss_mb": round(_memory_mb("VmHWM"), 1),
               "load_average": [round(x, 2) for x in os.getloadavg()]}
        timed.restore()
        outputs[name] = (output.float().clamp(min=0) * foreground).numpy()
        row["psnr_vs_reference"] = round(psnr(outputs[name], reference, head), 3)
        row["psnr_vs_first"] = round(psnr(outputs[name], outputs[runs[0]], foreground), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.demo:
        for row in rows:
            row["psnr_vs_demo"] = round(psnr(outputs[row["variant"]], outputs["demo"], foreground), 2)
            row["speedup_vs_demo"] = round(rows[-1]["seconds"] / row["seconds"], 2)
            row["cpu_speedup_vs_demo"] = round(rows[-1]["cpu_seconds"] / row["cpu_seconds"], 2)
    columns = ("variant", "seconds", "cpu_seconds", "encode_cpu_seconds", "query_cpu_seconds", "windows", "peak_rss_mb",
               "psnr_vs_reference", "psnr_vs_first", "psnr_vs_demo", "speedup_vs_demo", "cpu_speedup_vs_demo")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k in columns))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    record = {"threads": args.threads, "fov_scale": args.fov_scale, "cpu_count": os.cpu_count(),
              "rows": rows}
    with open(args.output + ".tmp", "w") as handle:
        json.dump(record, handle, indent=2)
    os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main()
