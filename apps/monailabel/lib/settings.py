"""What the app reads from its start command and ``--conf`` options, without monailabel (tested without a server)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os


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


def bundle_path(conf: dict[str, str], app_dir: str) -> str:
    """``--conf bundle PATH``, else this repository's ``bundle/`` (two folders above the app)."""
    path = os.path.realpath(conf.get("bundle") or os.path.join(app_dir, os.pardir, os.pardir, "bundle"))
    if not os.path.isfile(os.path.join(path, "configs", "metadata.json")):
        raise ValueError(f"{path}: not a TUMSyn bundle folder (no configs/metadata.json); pass --conf bundle PATH")
    return path


def bundle_version(path: str) -> str:
    """The served bundle's own version (``configs/metadata.json``), so the app never reports a stale one."""
    with open(os.path.join(path, "configs", "metadata.json")) as handle:
        return json.load(handle)["version"]
