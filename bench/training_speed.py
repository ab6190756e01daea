"""Training throughput of both stages at both scales: patches/s, voxel queries/s and the data-loading share.

    .venv/bin/python bench/training_speed.py [--stages 1 2] [--scales small paper] [--steps 6] [--threads 2]
                                             [--device cpu|cuda] [--precision fp32|bf16] [--num_workers 0]
                                             [--dataset_dir D]

Runs the configs' own ``train#trainer`` (``configs/stage1_train.yaml``, ``configs/stage2_train.yaml``) for
``--steps`` iterations on the simulated dataset (or ``--dataset_dir``), output into a temporary folder; ``bf16``
turns on the configs' ``amp`` (bf16 autocast of each step, GPU only). Stage 2 caches its first
``--subjects`` training subjects (as the config caches them); stage 1 its training list, repeated to fill a batch.
Timing comes from the trainer's events: data time is GET_BATCH_STARTED -> GET_BATCH_COMPLETED, compute time
ITERATION_STARTED -> ITERATION_COMPLETED; the first step (warm-up) is left out. Stage 1's "patches" are image crops
(it has no voxel queries); stage 2's are the low-resolution input patches, each with ``num_queries`` target voxels.
Each case runs in its own subprocess. Prints a table and writes ``bench/results/training_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from isolated_case import run_isolated

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "bundle"))


def run_case(stage: int, scale: str, steps: int, subjects: int, threads: int, device: str, precision: str,
             num_workers: int, dataset_dir: str | None) -> dict:
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    torch.set_num_threads(threads)
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO, "bundle", "configs", f"stage{stage}_train.yaml"))
    output_dir = tempfile.mkdtemp(prefix="tumsyn_bench_")
    parser.update({"scale": scale, "output_dir": output_dir, "progress_bar": False, "num_workers": num_workers,
                   "device": f"$torch.device('{device}')", "amp": precision == "bf16"})
    if dataset_dir:
        parser["dataset_dir"] = os.path.abspath(dataset_dir)
    if stage == 1:  # its batches drop the last partial one: repeat the training list to fill one batch at least
        parser.update({"train#datalist": "$@datalists[0] * (1 + @batch_size // max(1, len(@datalists[0])))"})
    else:
        parser.update({"train#datalist": f"$@datalists[0][:{subjects}]",
                       "text_encoder_path": None})  # an untrained text tower of the scale: same cost
    trainer = parser.get_parsed_content("train#trainer")
    marks: dict[str, list[float]] = {"batch_start": [], "batch_end": [], "step_start": [], "step_end": []}
    for event, key in ((Events.GET_BATCH_STARTED, "batch_start"), (Events.GET_BATCH_COMPLETED, "batch_end"),
                       (Events.ITERATION_STARTED, "step_start"), (Events.ITERATION_COMPLETED, "step_end")):
        trainer.add_event_handler(event, lambda engine, key=key: marks[key].append(time.perf_counter()))
    trainer.state.max_epochs, trainer.state.epoch_length = 1, steps + 1
    try:
        trainer.run()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)

    data = [end - start for start, end in zip(marks["batch_start"], marks["batch_end"])][1:]
    total = [end - start for start, end in zip(marks["step_start"], marks["step_end"])][1:]
    step = [t + d for t, d in zip(total, data)]  # ignite fires ITERATION_STARTED after the batch is fetched
    if stage == 1:
        patches = int(parser.get_parsed_content("batch_size"))
        queries = 0
    else:  # a batch holds at most as many subjects as are cached
        per_step = min(int(parser.get_parsed_content("batch_size")), len(parser.get_parsed_content("train#datalist")))
        patches = per_step * int(parser.get_parsed_content("patches_per_volume"))
        queries = patches * int(parser.get_parsed_content("num_queries"))
    seconds = statistics.median(step)
    processor = torch.cuda.get_device_name() if device.startswith("cuda") else platform.machine()
    return {"stage": stage, "scale": scale, "device": device, "processor": processor, "precision": precision,
            "num_workers": num_workers, "threads": threads, "steps_timed": len(step),
            "patches_per_step": patches, "queries_per_step": queries, "median_step_s": round(seconds, 3),
            "patches_per_s": round(patches / seconds, 2), "queries_per_s": round(queries / seconds, 1),
            "data_share": round(sum(data) / sum(step), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--scales", nargs="+", default=["small", "paper"])
    parser.add_argument("--steps", type=int, default=6, help="timed steps after one warm-up step")
    parser.add_argument("--subjects", type=int, default=2, help="training subjects cached")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--num_workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--dataset_dir", help="default: the configs' simulated dataset")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "training_speed.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case and print its JSON
    args = parser.parse_args()
    if args.case:
        stage, scale = args.case.split(",")
        print(json.dumps(run_case(int(stage), scale, args.steps, args.subjects, args.threads, args.device,
                                  args.precision, args.num_workers, args.dataset_dir)))
        return

    rows = []
    for stage in args.stages:
        for scale in args.scales:
            command = [sys.executable, __file__, "--case", f"{stage},{scale}", "--steps", str(args.steps),
                       "--subjects", str(args.subjects), "--threads", str(args.threads), "--device", args.device,
                       "--precision", args.precision, "--num_workers", str(args.num_workers)]
            command += ["--dataset_dir", args.dataset_dir] if args.dataset_dir else []
            rows.append(run_isolated(command, args.timeout, {"stage": stage, "scale": scale}))
            print(json.dumps(rows[-1]), flush=True)
    columns = ["stage", "scale", "patches_per_step", "median_step_s", "patches_per_s", "queries_per_s", "data_share"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row.get(c, row.get("error", "") if c == "median_step_s" else "")) for c in columns))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "load_average_at_end": os.getloadavg()}
    with open(args.output + ".tmp", "w") as handle:
        json.dump({"machine": machine, "cases": rows}, handle, indent=2)
    os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main()
