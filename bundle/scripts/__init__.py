"""TUMSyn bundle code: prompt layer, MR simulator, networks, engines. Configs import it as ``scripts``."""

import os
import sys

from .errors import guard_text_fields, install_excepthook

# The bundle folder (holding configs/, models/, scripts/): every default path in the configs derives from it,
# so a config behaves the same whether it is run from the repository root or from inside bundle/.
BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A bad input ends as one line (scripts.errors); prompts given as config overrides are never run as code.
# `monai.bundle run` has imported MONAI before it imports this package; scripts.inference_engine (which imports
# MONAI itself) installs the guard for code that imports the bundle first.
install_excepthook()
if "monai.bundle" in sys.modules:
    guard_text_fields()
