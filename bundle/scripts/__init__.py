"""TUMSyn bundle code: prompt layer, MR simulator, networks, engines. Configs import it as ``scripts``.

Importing it changes nothing in MONAI or ``sys``: what ``python -m monai.bundle run`` needs (one-line errors, text
overrides checked) is ``scripts.errors.check_bundle_run``, called by the first bundle function a config runs."""

import os

# The bundle folder (holding configs/, models/, scripts/): every default path in the configs derives from it,
# so a config behaves the same whether it is run from the repository root or from inside bundle/.
BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
