"""What the app's infer task does with a request, without a server: the picked image + a target prompt -> TUMSyn's
synthesized volume as a NIfTI file and the params returned to the client.

It needs only MONAI and the bundle (not monailabel), so it runs in the bundle's own environment as well as the
server's. Loading, prompt resolution, the output grid and the NIfTI writing are the bundle's
``scripts.engine.inference_engine.run_inference``; the network and inferer are the ones ``configs/inference.yaml``
defines.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any

import torch
from monai.bundle import ConfigParser

# What of the bundle's JSON sidecar goes back to the client as the result's params.
RESULT_FIELDS = ("prompt_given", "target_prompt", "source_prompt", "input_spacing", "target_spacing",
                 "output_spacing", "output_shape", "model_version", "intensity", "mirror_images_averaged",
                 "input_modality", "warnings", "ood_warnings")
# The bundle inferer's test-time option a request may set (checked by the engine; blank: the config's).
REQUEST_OPTIONS = ("flip_averaging",)
# The request params the task shows as its options, all blank (the bundle's choice) but the prompt.
OPTION_DEFAULTS = {"target_spacing": "", "input_modality": "", **{key: "" for key in REQUEST_OPTIONS}}


def _blank(value: Any) -> bool:
    """An option the request leaves out: absent, or empty text (what a client's form sends)."""
    return value is None or (isinstance(value, str) and not value.strip())


def requested_prompt(value: Any, default: str) -> str:
    """The request's ``prompt`` (official template or modality, e.g. "FLAIR"); the default when absent or blank."""
    if _blank(value):
        return default
    if not isinstance(value, str):
        raise ValueError(f"prompt: expected text (the official template or a modality such as 'FLAIR'), got {value!r}")
    return value


def requested_spacing(value: Any) -> Any:
    """The request's optional ``target_spacing`` (mm): 3 numbers (a list or "0.8, 0.8, 0.8"), one number, or absent.

    Text is split into numbers here; count, sign and finiteness are checked by the engine.
    """
    if _blank(value):
        return None
    if not isinstance(value, str):
        return value
    try:
        numbers = [float(v) for v in value.replace("(", "").replace(")", "").split(",")]
    except ValueError:
        raise ValueError(f"target_spacing: expected voxel sizes in mm such as '0.8, 0.8, 0.8', got {value!r}") from None
    return numbers[0] if len(numbers) == 1 else numbers


def read_bundle_config(bundle_path: str) -> ConfigParser:
    """``configs/inference.yaml`` with ``bundle_root`` set to ``bundle_path``, as MONAI Label reads a bundle; the
    bundle folder goes on ``sys.path`` first, as ``monai.bundle run`` puts it, so the config imports its ``scripts``."""
    if bundle_path not in sys.path:
        sys.path.insert(0, bundle_path)
    config = ConfigParser()
    config.read_config(os.path.join(bundle_path, "configs", "inference.yaml"))
    config.config["bundle_root"] = bundle_path
    return config


class Synthesis:
    """The bundle's synthesis for one served model: ``network`` (the bundle's ``network_def``, weights not yet
    loaded) gets ``ckpt_path`` once per device; each call reads its options from a request.

    Request params: ``prompt`` (the official template, or a modality optionally followed by fields, "FLAIR; Age: 70",
    the rest then filled from the image's metadata; default ``default_prompt``), ``target_spacing`` (output voxel size
    in mm; default the prompt's Voxel size, else the input's), ``input_modality`` (the image's contrast where its name
    or sidecar do not give it) and the inferer options in ``REQUEST_OPTIONS`` (default the bundle config's).
    """

    def __init__(self, bundle_config: ConfigParser, network: torch.nn.Module, ckpt_path: str,
                 default_prompt: str = "T2w"):
        # The inferer parsed now, in the same import of ``scripts`` as the engine, so the engine's Prompt objects are
        # the inferer's (MONAI Label re-imports the bundle's ``scripts`` on its own config accesses).
        self.engine = importlib.import_module("scripts.engine.inference_engine")
        self.inferer = bundle_config.get_parsed_content("inferer", instantiate=True)
        self.network = network
        self.ckpt_path = ckpt_path
        self.default_prompt = default_prompt
        self._networks: dict[str, torch.nn.Module] = {}

    @classmethod
    def from_bundle(cls, bundle_path: str, default_prompt: str = "T2w") -> Synthesis:
        """The synthesis of the bundle folder ``bundle_path`` (its inference config and ``models/model.pt``)."""
        config = read_bundle_config(bundle_path)
        network = config.get_parsed_content("network_def", instantiate=True)
        return cls(config, network, os.path.join(bundle_path, "models", "model.pt"), default_prompt)

    def network_on(self, device: str | torch.device) -> torch.nn.Module:
        """The network with its weights loaded safely (``weights_only``), one copy per device."""
        key = str(device)
        if key not in self._networks:
            network = copy.deepcopy(self.network).to(torch.device(key))
            self._networks[key] = self.engine.load_network_weights(network, self.ckpt_path)
        return self._networks[key]

    def __call__(self, image: str, request: dict[str, Any], device: str | torch.device = "cpu") -> tuple[str, dict]:
        """Synthesize ``image`` as ``request`` asks; returns the result NIfTI (a new temporary file the caller owns)
        and the result params. A bad request or image raises ``ValueError`` with the bundle's one-line reason and
        leaves no file behind."""
        network = self.network_on(device)
        prompt = requested_prompt(request.get("prompt"), self.default_prompt)
        spacing = requested_spacing(request.get("target_spacing"))
        # a per-request copy: one request's choices do not stick to the served inferer
        inferer = self.inferer.with_options(**{key: None if _blank(request.get(key)) else request[key]
                                               for key in REQUEST_OPTIONS})
        modality = None if _blank(request.get("input_modality")) else request["input_modality"]
        work_dir = tempfile.mkdtemp(prefix="tumsyn_label_")
        try:
            paths = self.engine.run_inference(image, prompt, work_dir, network, spacing, inferer=inferer, preview=False,
                                              input_modality=modality)
            with open(paths["sidecar"]) as handle:
                record = json.load(handle)
            # MONAI Label sends the result file and then deletes it: it lives outside the work folder.
            descriptor, result_path = tempfile.mkstemp(suffix=".nii.gz", prefix=f"{record['output_image'][:-7]}_")
            os.close(descriptor)
            shutil.move(paths["image"], result_path)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        return result_path, {key: record[key] for key in RESULT_FIELDS}
