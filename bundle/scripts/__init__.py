"""TUMSyn bundle code: prompt layer, MR simulator, networks, engines. Configs import it as ``scripts``."""

import os

# The bundle folder (holding configs/, models/, scripts/): every default path in the configs derives from it,
# so a config behaves the same whether it is run from the repository root or from inside bundle/.
BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
