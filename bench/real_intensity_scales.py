"""How the shipped text model's correlation with a real target depends on its input's intensity scale.

    python bench/real_intensity_scales.py [--dataset_dir ../shared/data/real/bids] [--downsample 4]
                                          [--factors 0.6 0.8 1 1.4 2] [--flip_averaging] [--threads 2]
                                          [--ckpt_path bundle/models/model.pt] [--guided_filter_radius 0]
                                          [--output FILE.json]

For each factor, the evaluate config's engine with ``intensity_scales=[factor]`` (the normalised input multiplied by
it) on the real-case tasks; then once with all factors averaged. The network's own predictions by default
(``--guided_filter_radius 0``, as the committed grids were measured); 1 guides them by the input as inference does.
Prints Pearson r per task and factor (the input's and the oracle lookup table's r beside) and writes it as JSON: the
grid of docs/real_data.md's section on intensity scales.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUNDLE = os.path.join(REPO, "bundle")
sys.path.insert(0, BUNDLE)


def correlations(dataset_dir: str, network, inferer) -> dict[str, dict[str, float]]:
    """r of the text model, the input and the lookup table per task: ``{task: {method: r}}`` (the task prefixed by
    the subject when the dataset has several)."""
    from scripts.engine.evaluation import Method, run_evaluation

    methods = [Method("tumsyn", network), Method("identity", None, "identity"),
               Method("oracle-lut", None, "oracle_lut")]
    with tempfile.TemporaryDirectory() as output_dir:
        rows = run_evaluation(dataset_dir, output_dir, methods, inferer)
    several = len({row["subject"] for row in rows}) > 1
    table: dict[str, dict[str, float]] = {}
    for row in rows:
        task = f"{row['subject']} {row['task']}" if several else row["task"]
        table.setdefault(task, {})[row["method"]] = row["pearson"]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset_dir", default=os.path.join(os.path.dirname(REPO), "shared", "data", "real", "bids"))
    parser.add_argument("--downsample", type=int, default=4, help="block-average factor (evaluate's eval_downsample)")
    parser.add_argument("--factors", type=float, nargs="+", default=[0.6, 0.8, 1.0, 1.4, 2.0])
    parser.add_argument("--flip_averaging", action="store_true")
    parser.add_argument("--ckpt_path", default=os.path.join(BUNDLE, "models", "model.pt"),
                        help="text-model weights (small scale) to measure")
    parser.add_argument("--guided_filter_radius", type=int, default=0, help="0: the network's predictions as they are")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "real_intensity_scales.json"))
    args = parser.parse_args()

    import torch
    from monai.bundle import ConfigParser

    from scripts.engine.evaluation import downsample_bids
    from scripts.engine.inference_engine import load_network_weights
    from scripts.nets.tumsyn_net import build_tumsyn_net

    torch.set_num_threads(args.threads)
    config = ConfigParser()
    config.read_config(os.path.join(BUNDLE, "configs", "evaluate.yaml"))
    config["bundle_root"] = BUNDLE
    inferer = config.get_parsed_content("inferer").with_options(
        flip_averaging=args.flip_averaging, guided_filter_radius=args.guided_filter_radius)
    network = load_network_weights(build_tumsyn_net("small"), args.ckpt_path).eval()
    with tempfile.TemporaryDirectory() as small:
        dataset_dir = args.dataset_dir
        if args.downsample > 1:
            dataset_dir = downsample_bids(args.dataset_dir, small, args.downsample)
        runs = {f"{factor:g}": correlations(dataset_dir, network, inferer.with_options(intensity_scales=[factor]))
                for factor in args.factors}
        runs["mean"] = correlations(dataset_dir, network, inferer.with_options(intensity_scales=args.factors))
    tasks = list(runs["mean"])
    print(f"Pearson r, text model, {args.downsample} mm, flip averaging {args.flip_averaging}")
    print("| task | input | oracle LUT | " + " | ".join(runs) + " |")
    print("|---|---|---|" + "---|" * len(runs))
    for task in tasks:
        baselines = runs["mean"][task]
        print(f"| {task} | {baselines['identity']:.3f} | {baselines['oracle-lut']:.3f} | "
              + " | ".join(f"{run[task]['tumsyn']:.3f}" for run in runs.values()) + " |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"settings": vars(args), "pearson": runs}, handle, indent=2)


if __name__ == "__main__":
    main()
