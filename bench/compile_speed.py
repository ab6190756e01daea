"""Does torch.compile pay for the inference engine? One process: the engine as configured, then with the network's
window encoder and/or decoder query compiled (``dynamic=True``: cut windows and the last decode chunk vary in shape).

    python bench/compile_speed.py [--scale small] [--source mni] [--input 1mm] [--device cuda] [--precision fp32]
                                  [--roi_size N] [--threads 8] [--parts encode query] [--mode default]
                                  [--repeats 3] [--output FILE.json]

Prints and writes the plain engine's median warm seconds, the compiled engine's first call (compilation included) and
median warm seconds, and the largest difference between their outputs. The case is ``inference_speed.py``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import inference_speed as case

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    case.add_case_arguments(parser, scale="small", precision="fp32")
    parser.add_argument("--parts", nargs="+", default=["encode", "query"], choices=["encode", "query"])
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "compile_speed.json"))
    args = parser.parse_args()

    import numpy as np
    import torch

    device = torch.device(args.device)
    overrides = {} if args.roi_size is None else {"roi_size": case.parse_override("roi_size", args.roi_size)}
    array, _, _, out_shape, network, inferer = case.prepare_case(
        args.scale, args.input, args.source, 1.0, args.threads, args.device, args.precision, overrides, False)
    image = torch.from_numpy(np.ascontiguousarray(array))[None, None]

    def timed_call():
        start = time.perf_counter()
        output = inferer(image, network, prompt=case.PROMPT, out_shape=out_shape)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, output

    def warm_median():
        return round(statistics.median(timed_call()[0] for _ in range(args.repeats)), 3)

    timed_call()  # CUDA, cuDNN and cuBLAS set up
    plain_seconds = warm_median()
    _, plain = timed_call()
    # The engine calls network.encode per window and network.query per decode chunk; compile those attributes.
    if "encode" in args.parts:
        network.encode = torch.compile(network.encode, dynamic=True, mode=args.mode)
    if "query" in args.parts:
        network.decoder.query = torch.compile(network.decoder.query, dynamic=True, mode=args.mode)
    first_seconds, compiled = timed_call()
    row = {**vars(args), "processor": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "plain_seconds": plain_seconds, "compiled_first_call_seconds": round(first_seconds, 2),
           "compiled_seconds": warm_median(),
           "max_abs_difference": float((compiled - plain).abs().max())}
    print(json.dumps(row))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".tmp", "w") as handle:
        json.dump(row, handle, indent=2)
    os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main()
