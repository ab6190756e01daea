"""Where one warm call of the inference engine spends its time: ``torch.profiler`` operators by device time.

    python bench/profile_engine.py [--scale paper] [--source mni] [--input 1mm] [--device cuda]
                                   [--precision bf16] [--roi_size N] [--cudnn_benchmark] [--top 25]
                                   [--output FILE.json]

The case is ``inference_speed.py``'s (same inputs, network, weights and engine settings); the engine runs once
untimed, then once under the profiler. Prints the operators, and on a GPU the kernels, with the most self time (on
the device; on a CPU, the CPU's) and writes them with the call's wall seconds, the GPU's busy seconds (the kernels'
summed durations) and the kernel count; on a GPU also the operators with the most self time on the host (where a
launch-bound call spends it).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import inference_speed as case

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    case.add_case_arguments(parser, scale="paper", precision="bf16")
    parser.add_argument("--cudnn_benchmark", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "profile_engine.json"))
    args = parser.parse_args()

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    overrides = {} if args.roi_size is None else {"roi_size": case.parse_override("roi_size", args.roi_size)}
    array, _, _, out_shape, network, inferer = case.prepare_case(args.scale, args.input, args.source, 1.0, args.threads,
                                                                 args.device, args.precision, overrides,
                                                                 args.cudnn_benchmark)
    image = torch.from_numpy(np.ascontiguousarray(array))[None, None]

    def synthesize():
        inferer(image, network, prompt=case.PROMPT, out_shape=out_shape)
        if device.type == "cuda":
            torch.cuda.synchronize()

    synthesize()  # warm-up: CUDA, cuDNN and cuBLAS set up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        synthesize()
        wall = time.perf_counter() - start
    on_device = device.type == "cuda"
    time_key = "self_device_time_total" if on_device else "self_cpu_time_total"
    # Operators (the host-side calls) and, on a GPU, the kernels they launched: each list partitions the time.
    tables = {}
    for kind in ("operator", "kernel") if on_device else ("operator",):
        events = [e for e in profiler.key_averages() if (e.device_type.name == "CUDA") == (kind == "kernel")]
        events.sort(key=lambda e: getattr(e, time_key), reverse=True)
        tables[kind] = [{"name": e.key, "calls": e.count, "self_seconds": round(getattr(e, time_key) / 1e6, 4)}
                        for e in events[: args.top]]
    if on_device:  # a launch-bound call: where the host's time goes
        events = [e for e in profiler.key_averages() if e.device_type.name != "CUDA"]
        events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        tables["host operator"] = [{"name": e.key, "calls": e.count,
                                    "self_seconds": round(e.self_cpu_time_total / 1e6, 4)}
                                   for e in events[: args.top]]
    kernels = [e for e in profiler.events() if e.device_type.name == "CUDA"]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 if on_device else None
    print(f"wall {wall:.3f} s" + (f", device busy {busy:.3f} s, {len(kernels)} kernels" if on_device else ""))
    for kind, rows in tables.items():
        print(f"top {kind}s by self {'device' if on_device and kind != 'host operator' else 'CPU'} time:")
        for row in rows:
            print(f"{row['self_seconds']:8.4f} s {row['calls']:7d}  {row['name'][:100]}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".tmp", "w") as handle:
        json.dump({**vars(args), "wall_seconds": round(wall, 3), "device_busy_seconds": busy,
                   "kernel_count": len(kernels), **tables}, handle, indent=2)
    os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main()
