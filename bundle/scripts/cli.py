"""The ``tumsyn`` command: thin wrappers; the bundle configs stay the source of truth for every job."""

from __future__ import annotations

import os
import sys
from typing import Any

import fire

from scripts import BUNDLE_ROOT
from scripts.prompt import prompt_from_image


def _config(name: str) -> str:
    return os.path.join(BUNDLE_ROOT, "configs", f"{name}.yaml")


def _run_config(name: str, run_id: str = "run", **overrides: Any) -> None:
    from monai.bundle import run

    run(run_id, config_file=_config(name), **overrides)


def prompt(image: str, **fields: Any) -> str:
    """Print the prompt built from IMAGE's own metadata (BIDS sidecar + participants.tsv, DICOM, NIfTI header).

    Fields given as ``--modality T2w --age 40 --tr 3000`` override what the metadata says.
    """
    return prompt_from_image(image, **fields).render()


def simulate(output_dir: str | None = None, num_subjects: int | None = None, seed: int | None = None) -> None:
    """Write a simulated BIDS dataset (bundle/configs/simulate.yaml)."""
    given = {"output_dir": output_dir, "num_subjects": num_subjects, "seed": seed}
    _run_config("simulate", **{k: v for k, v in given.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    """Entry point: a bad input ends with one line on stderr and exit status 1, never a traceback."""
    commands = {"prompt": prompt, "simulate": simulate}
    try:
        fire.Fire(commands, command=argv, name="tumsyn")
    except (ValueError, FileNotFoundError) as error:
        print(f"tumsyn: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
