"""The one package ``pip install -e .`` adds: it puts this checkout's bundle folder on ``sys.path``, where the bundle's
code imports as ``scripts`` as in every model-zoo bundle, and runs the ``tumsyn`` command. The configs import it
first, so ``python -m monai.bundle run --config_file bundle/configs/...`` finds ``scripts`` from the repository root
too; without the install (an unzipped zoo bundle run from its own folder) that import is skipped by MONAI and the
current folder holds ``scripts``. Installing ``scripts`` itself would collide with every other bundle's ``scripts``."""

import os
import sys

BUNDLE_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
# After sys.path[0] (the current folder under `python -m`), as `monai.bundle run` inserts a bundle root: a bundle
# run from its own folder keeps its own `scripts`.
if BUNDLE_ROOT not in sys.path:
    sys.path.insert(1, BUNDLE_ROOT)


def main() -> None:
    if not os.path.isdir(os.path.join(BUNDLE_ROOT, "scripts")):
        sys.exit(f"tumsyn: no bundle folder at {BUNDLE_ROOT}; install the checkout in editable mode (pip install -e .)")
    from scripts.cli import main as bundle_main

    bundle_main()
