"""The grey-level curve a unet checkpoint applies to its input skip, per prompt and input contrast.

Prints the curve's values at the first knots (input intensities in white-matter-peak units: white matter at 0.8),
where the darkest tissue of each contrast lies (CSF of a T1w). A prompt with and without its imaging parameters
should give curves of the same shape: the target contrast is named in both.

    .venv/bin/python bench/prompt_curves.py CHECKPOINT T1w "Modality: T2w" "Age: 30; ...; Modality: T2w; ..." ...
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bundle"))

from scripts.engine.inference_engine import load_network_weights  # noqa: E402
from scripts.nets.tumsyn_net import build_tumsyn_net  # noqa: E402
from scripts.prompt import MODALITIES, Prompt, tokenize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("source", choices=MODALITIES, help="the input's contrast")
    parser.add_argument("prompts", nargs="+", help="target prompts (the template, or any part of it)")
    parser.add_argument("--knots", type=int, default=16, help="curve values printed, from intensity 0")
    args = parser.parse_args()
    network = load_network_weights(build_tumsyn_net("unet"), args.checkpoint).eval()
    transfer = network.transfer
    spacing = transfer.max_intensity / (transfer.identity.numel() - 1)
    print("input   " + " ".join(f"{i * spacing:5.2f}" for i in range(args.knots)))
    source = torch.tensor([MODALITIES.index(args.source)])
    with torch.no_grad():
        for text in args.prompts:
            prompt = Prompt.parse(text).render()
            knots = transfer(network.embed_condition(tokenize(prompt), source=source))[0, :args.knots]
            print("output  " + " ".join(f"{v:5.2f}" for v in knots.tolist()) + f"   <- {text}")


if __name__ == "__main__":
    main()
