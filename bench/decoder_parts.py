"""What each part of the unet decoder contributes: the full network against its grey-level curve alone.

The unet scale's output is a grey-level curve of the input (one per prompt and input contrast) plus the LIIF MLP's
correction. This runs evaluation cases (``scripts.engine.evaluation``, as ``evaluate.yaml`` synthesizes them) twice,
once as shipped and once with the MLP's last layer at zero (the curve alone), and prints PSNR / Pearson r of both
beside the input itself (trilinear interpolation onto the target grid). A correction that lowers the curve's score
is a correction the network has not learned; a curve below the input on a same-contrast task is a curve that is not
the identity.

    .venv/bin/python bench/decoder_parts.py CHECKPOINT DATASET_DIR "sag4mm T1w->T1w" "T1w->T2w" ...
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bundle"))

from scripts.engine import evaluation  # noqa: E402
from scripts.engine.inference_engine import load_network_weights  # noqa: E402
from scripts.engine.metrics import compare  # noqa: E402
from scripts.engine.volume_io import load_volume  # noqa: E402
from scripts.nets.tumsyn_net import build_tumsyn_net  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("dataset_dir", help="a simulated BIDS dataset with truth masks (evaluation subjects)")
    parser.add_argument("tasks", nargs="+", help="evaluation task names (scripts/engine/evaluation.py TASKS)")
    parser.add_argument("--scale", default="unet")
    args = parser.parse_args()
    network = load_network_weights(build_tumsyn_net(args.scale), args.checkpoint).eval()
    last_layer = network.decoder.mlp[-1]
    trained = {name: value.detach().clone() for name, value in last_layer.state_dict().items()}
    inferer = evaluation.inference_inferer(os.path.join(ROOT, "bundle"), scale=args.scale)
    method = evaluation.Method("tumsyn", network)
    print("| site | subject | task | network PSNR / r | curve alone | input (trilinear) |")
    print("|---|---|---|---|---|---|")
    for case in evaluation.bids_cases(args.dataset_dir, evaluation.tasks_named(args.tasks)):
        reference = load_volume(case.target_path)
        truth = reference.array
        source = evaluation._resampled_source(case.source_path, truth.shape, reference.affine)
        mask = (load_volume(case.mask_path).array > 0.5) & (truth != 0)
        scores = []
        for keep in (1.0, 0.0):  # as trained, then the correction switched off
            last_layer.load_state_dict({name: value * keep for name, value in trained.items()})
            with torch.no_grad():
                prediction = evaluation._predict(method, case, inferer, source, truth, mask, reference.affine)
            scores.append(compare(prediction, truth, mask))
        last_layer.load_state_dict(trained)
        scores.append(compare(source, truth, mask))
        cells = " | ".join(f"{s['psnr']:.2f} / {s['pearson']:.3f}" for s in scores)
        print(f"| {case.site} | {case.subject} | {case.task.name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
