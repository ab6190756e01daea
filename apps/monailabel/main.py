"""MONAI Label app serving TUMSyn: pick an image, give a target prompt, get the synthesized volume.

    monailabel start_server --app apps/monailabel --studies <folder> --host 127.0.0.1 --port 8000

Options (``--conf key value``): ``bundle`` (the TUMSyn bundle folder; default this repository's ``bundle/``),
``prompt`` (the default target prompt, "T2w"), ``allow_remote`` ("true" to serve on a non-loopback address).
"""

from __future__ import annotations

import logging
import sys

from monailabel.interfaces.app import MONAILabelApp

from lib.infers import TUMSynSynthesis
from lib.settings import bundle_path, bundle_version, check_loopback, requested_host

logger = logging.getLogger(__name__)

MODEL_NAME = "tumsyn"


class TUMSynApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        check_loopback(requested_host(sys.argv), conf.get("allow_remote", "false").lower() == "true")
        self.bundle_path = bundle_path(conf, app_dir)
        self.default_prompt = conf.get("prompt", "T2w")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="TUMSyn",
            description="Text-guided brain MRI synthesis and arbitrary-scale super-resolution (TUMSyn bundle)",
            version=bundle_version(self.bundle_path),
        )

    def init_infers(self):
        logger.info("TUMSyn bundle: %s (default prompt %r)", self.bundle_path, self.default_prompt)
        return {MODEL_NAME: TUMSynSynthesis(self.bundle_path, self.conf, default_prompt=self.default_prompt)}
