"""MONAI Label app serving TUMSyn: pick an image, give a target prompt, get the synthesized volume.

    monailabel start_server --app apps/monailabel --studies <folder> --host 127.0.0.1 --port 8000

Options (``--conf key value``): ``bundle`` (the TUMSyn bundle folder; default the installed ``scripts`` package's),
``prompt`` (the default target prompt, "T2w"), ``allow_remote`` ("true" to serve on a non-loopback address).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys

from monailabel.interfaces.app import MONAILabelApp

from lib.infers import TUMSynSynthesis

logger = logging.getLogger(__name__)

MODEL_NAME = "tumsyn"


def requested_host(argv: list[str]) -> str | None:
    """The address ``monailabel start_server`` binds (its own default, 0.0.0.0, when no --host is given).

    None when the process was not started by ``start_server`` (e.g. a bare uvicorn), where the host is unknown.
    """
    if "start_server" not in argv:
        return None
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("-i", "--host", default="0.0.0.0")
    return parser.parse_known_args(argv[argv.index("start_server") + 1 :])[0].host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


def check_loopback(host: str | None, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless asked for: the server has no authentication and reads the studies."""
    if host is not None and not is_loopback(host) and not allow_remote:
        raise ValueError(
            f"--host {host}: this app serves on loopback only; start it with --host 127.0.0.1, or add "
            f"--conf allow_remote true to expose the unauthenticated server to the network deliberately"
        )


def bundle_version(bundle_path: str) -> str:
    """The served bundle's own version (``configs/metadata.json``), so the app never reports a stale one."""
    with open(os.path.join(bundle_path, "configs", "metadata.json")) as handle:
        return json.load(handle)["version"]


class TUMSynApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        check_loopback(requested_host(sys.argv), conf.get("allow_remote", "false").lower() == "true")
        self.bundle_path = os.path.realpath(conf.get("bundle") or __import__("scripts").BUNDLE_ROOT)
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
