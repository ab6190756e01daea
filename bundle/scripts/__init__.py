"""TUMSyn bundle code, imported as ``scripts`` from the bundle folder (the model-zoo convention): ``nets`` (networks),
``engine`` (inference, evaluation, volume I/O), ``train`` (training handlers and transforms), ``data`` (BIDS datasets,
intensity, registration), ``simulator``; the prompt layer, errors and the ``tumsyn`` command at the top.

Importing it changes nothing in MONAI or ``sys``: what ``python -m monai.bundle run`` needs (one-line errors, text
overrides checked) is ``scripts.errors.check_bundle_run``, called by the first bundle function a config runs."""

import os

# The bundle folder (holding configs/, models/, scripts/): every default path in the configs derives from it,
# so a config behaves the same whether it is run from the repository root or from inside bundle/.
BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
