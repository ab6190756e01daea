"""How well a stage-2 checkpoint fits its own training distribution, against per-patch baselines.

Draws training patches as stage 2 does (``configs/stage2_train.yaml``, every target contrast of each input) from the
first training subjects, on the truth grid (``--native_prob 1``: the ~1 mm inputs users bring) or at the recipe's
scales, and prints per (source, target) pair the network's L1 and Pearson r at the query points beside two
baselines on the same points: the input itself (identity) and a lookup table of 32 input-intensity bins fitted on the
patch's own labels (an oracle voxel-wise mapping). A network below the lookup table on its training patches is
under-fitted, whatever it does on held-out data.

    .venv/bin/python bench/unet_training_fit.py CHECKPOINT [--scale unet] [--subjects 3] [--native_prob 1.0]
"""

import argparse
import collections
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bundle"))

from monai.bundle import ConfigParser  # noqa: E402

from scripts.engine.inference_engine import load_network_weights  # noqa: E402
from scripts.nets.tumsyn_net import build_tumsyn_net  # noqa: E402
from scripts.prompt import MODALITIES  # noqa: E402


def oracle_lut(source: np.ndarray, label: np.ndarray, bins: int = 32) -> np.ndarray:
    """Each point's label replaced by the median label of its source-intensity quantile bin."""
    index = np.digitize(source, np.quantile(source, np.linspace(0, 1, bins + 1)[1:-1]))
    mapped = np.zeros_like(label)
    for b in np.unique(index):
        mapped[index == b] = np.median(label[index == b])
    return mapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="model.pt or a training checkpoint (its 'network' entry)")
    parser.add_argument("--scale", default="unet")
    parser.add_argument("--dataset_dir", default=os.path.join(ROOT, "bundle", "data", "simulated"))
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--native_prob", type=float, default=1.0)
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "results", "unet_training_fit.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = ConfigParser()
    config.read_config(os.path.join(ROOT, "bundle", "configs", "stage2_train.yaml"))
    config.update({"scale": args.scale, "dataset_dir": args.dataset_dir, "native_prob": args.native_prob,
                   "source_dropout": 0.0})  # every pair named by its known input contrast
    preprocessing = config.get_parsed_content("train#preprocessing")
    preprocessing.set_random_state(0)
    network = build_tumsyn_net(args.scale)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    if "network" in state:
        network.load_state_dict(state["network"])
    else:
        load_network_weights(network, args.checkpoint)
    network.eval()

    scores = collections.defaultdict(list)
    for item in config.get_parsed_content("train#datalist")[: args.subjects]:
        for sample in preprocessing(item):
            tokens = sample["tokens"] if sample["tokens"].dim() == 2 else sample["tokens"][None]
            with torch.no_grad():
                prediction = network(sample["image"][None], tokens=tokens[None], coords=sample["coords"][None],
                                     cell=sample["cell"][None],
                                     source=torch.as_tensor(sample["input_modality"]).reshape(1))[0].numpy()
            grid = sample["coords"][None, :, None, None, [2, 1, 0]]  # grid_sample reads (x, y, z) = (W, H, D)
            source = F.grid_sample(sample["image"][None], grid, align_corners=False)[0, 0, :, 0, 0].numpy()
            modalities = sample["modality"].reshape(-1)
            for k, target in enumerate(modalities):
                label = sample["label"][:, k].numpy()
                pair = f"{MODALITIES[int(sample['input_modality'])]}->{MODALITIES[int(target)]}"
                for method, values in (("network", prediction[:, k]), ("identity", source),
                                       ("oracle-lut", oracle_lut(source, label))):
                    scores[(pair, method)].append((np.abs(values - label).mean(), np.corrcoef(values, label)[0, 1]))

    table = {f"{pair} {method}": {"l1": float(np.mean([s[0] for s in v])), "r": float(np.nanmean([s[1] for s in v])),
                                  "patches": len(v)} for (pair, method), v in sorted(scores.items())}
    for method in ("network", "identity", "oracle-lut"):
        every = [s for (_, m), v in scores.items() if m == method for s in v]
        table[f"all {method}"] = {"l1": float(np.mean([s[0] for s in every])),
                                  "r": float(np.nanmean([s[1] for s in every])), "patches": len(every)}
    for name, row in table.items():
        print(f"{name:28s} L1 {row['l1']:.4f}  r {row['r']:+.3f}  ({row['patches']} patches)")
    with open(args.output, "w") as handle:
        json.dump({"checkpoint": os.path.basename(args.checkpoint), "native_prob": args.native_prob,
                   "subjects": args.subjects, "table": table}, handle, indent=1)


if __name__ == "__main__":
    main()
