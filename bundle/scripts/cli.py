"""The ``tumsyn`` command: thin wrappers; the bundle configs stay the source of truth for every job."""

from __future__ import annotations

import os
import sys
from typing import Any

import fire

from scripts import BUNDLE_ROOT
from scripts.errors import TEXT_FIELDS, UserInputError, quoted, user_error
from scripts.prompt import prompt_from_image

# In a string literal these stand for themselves; MONAI's parser would read `@` as a reference, `%` as a macro and
# `#` or `::` as an id separator anywhere in a `$` expression, so they are written as escapes it does not look into.
_PARSER_CHARACTERS = str.maketrans({"@": "\\x40", "%": "\\x25", ":": "\\x3a", "#": "\\x23"})


def literal_override(field: str, value: Any) -> str | None:
    """A config override that MONAI's parser turns into exactly the text ``value``: the ``$`` expression of a Python
    string literal, so a prompt such as ``$...``, ``@id`` or ``%file#key`` is neither run nor replaced. None stays
    None (the config's default); a value ``fire`` read as something else (a number, a dict) is a one-line error."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserInputError(f"{field}: expected text, got {quoted(value)} (fire read it as {type(value).__name__}; "
                             f"quote it twice: --{field} '\"...\"')")
    return "$" + repr(value).translate(_PARSER_CHARACTERS)


def _config(name: str) -> str:
    return os.path.join(BUNDLE_ROOT, "configs", f"{name}.yaml")


def _run_config(name: str, run_id: str = "run", **overrides: Any) -> None:
    from monai.bundle import run

    # the text fields are data; every other override is config, as under `python -m monai.bundle run`
    overrides.update({field: literal_override(field, overrides[field]) for field in TEXT_FIELDS if field in overrides})
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


def train(stage: int, **overrides: Any) -> None:
    """Train stage 1 (BMLIP text encoder) or 2 (synthesis network): configs/stage{1,2}_train.yaml, same overrides."""
    if stage not in (1, 2):
        raise UserInputError(f"train: expected stage 1 or 2, got {stage!r}")
    _run_config(f"stage{stage}_train", "training", **overrides)


def infer(**overrides: Any) -> None:
    """Synthesize (configs/inference.yaml): --input_image IN --prompt "..." --output_dir O; none = the default."""
    _run_config("inference", **overrides)


def evaluate(**overrides: Any) -> None:
    """Benchmark on held-out subjects (configs/evaluate.yaml): --dataset_dir D --output_dir O."""
    _run_config("evaluate", **overrides)


def main(argv: list[str] | None = None) -> None:
    """Entry point: a bad input ends with one line on stderr and exit status 1, never a traceback."""
    commands = {"prompt": prompt, "simulate": simulate, "train": train, "infer": infer, "evaluate": evaluate}
    try:
        fire.Fire(commands, command=argv, name="tumsyn")
    except Exception as error:  # noqa: BLE001 - a bad input ends as one line naming its cause; a bug as a traceback
        cause = user_error(error)
        if cause is None:
            raise
        print(f"tumsyn: error: {cause}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
