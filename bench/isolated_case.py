"""Run one benchmark case in a fresh process, so its timing and peak memory are its own."""

import json
import subprocess


def run_isolated(command: list[str], timeout: float, label: dict) -> dict:
    """The JSON row the case prints last, or ``label`` with the error (a timeout, or the child's last stderr line)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {**label, "error": f"timed out after {timeout} s"}
    except subprocess.CalledProcessError as error:
        return {**label, "error": error.stderr.strip().splitlines()[-1]}
