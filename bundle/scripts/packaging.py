"""Build the archive the MONAI model zoo publishes: ``<name>_v<version>.zip`` holding one folder ``<name>/``.

``python -m monai.bundle download --name <name> --url file://<zip>`` extracts such an archive into its
``bundle_dir``, so the folder inside must be named after the bundle. The folder holds what the zoo requires
(configs/ with metadata.json and inference.yaml, models/model.pt, docs/README.md, LICENSE) plus the ``scripts``
package the configs import; never outputs, data or caches.

    python -m scripts.packaging [--output_dir dist] [--name NAME]      (or: make package)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import zipfile

from . import BUNDLE_ROOT

# What goes in, relative to the bundle folder; folders are copied recursively, minus EXCLUDED names.
INCLUDED = ("configs", "models/model.pt", "scripts", "docs")
REQUIRED = ("configs/metadata.json", "configs/inference.yaml", "models/model.pt", "docs/README.md")
EXCLUDED_DIRS = {"__pycache__", ".ipynb_checkpoints"}
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".tmp")


def bundle_name(metadata: dict) -> str:
    """The zoo's folder name for a bundle: its metadata ``name`` in snake case ("TUMSyn brain MRI synthesis" ->
    ``tumsyn_brain_mri_synthesis``), the way zoo bundles are named (``spleen_ct_segmentation``)."""
    name = re.sub(r"[^a-z0-9]+", "_", str(metadata.get("name", "")).lower()).strip("_")
    if not name:
        raise ValueError("metadata.json 'name': expected a non-empty bundle name")
    return name


def read_release(bundle_root: str = BUNDLE_ROOT) -> tuple[str, str]:
    """(bundle name, version) from ``configs/metadata.json``; the version must have a changelog entry."""
    path = os.path.join(bundle_root, "configs", "metadata.json")
    with open(path) as handle:
        metadata = json.load(handle)
    version = metadata.get("version")
    if not version or version not in metadata.get("changelog", {}):
        raise ValueError(f"{path}: version {version!r} has no entry in 'changelog' (the zoo requires one)")
    return bundle_name(metadata), version


def _bundle_files(bundle_root: str) -> list[str]:
    """Paths relative to ``bundle_root`` of everything that goes in the archive, sorted."""
    files = []
    for entry in INCLUDED:
        path = os.path.join(bundle_root, entry)
        if os.path.isfile(path):
            files.append(entry)
            continue
        for folder, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
            files += [os.path.relpath(os.path.join(folder, n), bundle_root) for n in names
                      if not n.endswith(EXCLUDED_SUFFIXES) and not n.startswith(".")]
    return sorted(files)


def build_zoo_archive(output_dir: str, bundle_root: str = BUNDLE_ROOT, name: str | None = None,
                      license_file: str | None = None) -> str:
    """Write ``output_dir/<name>_v<version>.zip`` (atomically) and return its path.

    ``license_file`` defaults to the repository's LICENSE beside the bundle folder; it is stored as ``<name>/LICENSE``.
    """
    default_name, version = read_release(bundle_root)
    name = name or default_name
    license_file = license_file or os.path.join(os.path.dirname(os.path.abspath(bundle_root)), "LICENSE")
    missing = [p for p in REQUIRED if not os.path.isfile(os.path.join(bundle_root, p))]
    if not os.path.isfile(license_file):
        missing.append(license_file)
    if missing:
        raise ValueError(f"{bundle_root}: cannot package, missing {', '.join(missing)}")
    os.makedirs(output_dir, exist_ok=True)
    archive = os.path.join(output_dir, f"{name}_v{version}.zip")
    temporary = f"{archive}.{os.getpid()}.tmp"
    with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        for relative in _bundle_files(bundle_root):
            handle.write(os.path.join(bundle_root, relative), f"{name}/{relative}")
        handle.write(license_file, f"{name}/LICENSE")
    os.replace(temporary, archive)
    return archive


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.packaging", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="dist", help="folder of the archive (default: dist)")
    parser.add_argument("--name", default=None, help="bundle folder name (default: from metadata.json)")
    args = parser.parse_args(argv)
    print(build_zoo_archive(args.output_dir, name=args.name))


if __name__ == "__main__":
    main()
