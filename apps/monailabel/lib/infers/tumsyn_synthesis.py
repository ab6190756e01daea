"""MONAI Label infer task: the picked image + a target prompt -> TUMSyn's synthesized volume.

The stock bundle task resamples every prediction back onto the input grid (``add_post_restore``), which would
undo super-resolution; this task returns the bundle's own output grid (the input's field of view at the requested
voxel size, its affine in the input's world space) instead. Loading, prompt resolution, the grid and the NIfTI
writing are the bundle's ``scripts.inference_engine.run_inference``, with the network and inferer the bundle's
``configs/inference.yaml`` defines.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Sequence

import torch
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

logger = logging.getLogger(__name__)

# What of the bundle's JSON sidecar goes back to the client as the result's params.
RESULT_FIELDS = ("prompt_given", "target_prompt", "source_prompt", "input_spacing", "target_spacing",
                 "output_spacing", "output_shape", "model_version", "intensity", "mirror_images_averaged",
                 "intensity_scales_averaged", "intensity_scales_auto", "guided_filter_radius", "coarse_pass",
                 "input_modality", "warnings", "ood_warnings")


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


class TUMSynSynthesis(BundleInferTask):
    """Text-guided synthesis / super-resolution of the picked image; request params ``prompt``, ``target_spacing``,
    ``input_modality``, ``flip_averaging``, ``intensity_scales``, ``guided_filter_radius`` and ``coarse_pass``.

    ``prompt``: the official template, or a modality optionally followed by fields ("FLAIR", "FLAIR; Age: 70"),
    the rest then filled from the image's metadata; ``target_spacing``: output voxel size in mm (default: the
    prompt's Voxel size, else the input's); ``input_modality``: the image's contrast where its name or sidecar do not
    give it; ``flip_averaging``: true/false; ``intensity_scales``: "auto" or factors such as "0.6, 0.8, 1, 1.4, 2";
    ``guided_filter_radius``: output voxels, 0 for the network's prediction as it is; ``coarse_pass``: true/false
    (the four default to the bundle config's).
    """

    def __init__(self, bundle_path: str, conf: dict[str, str], default_prompt: str = "T2w"):
        super().__init__(
            bundle_path,
            conf,
            type=InferType.OTHERS,
            add_post_restore=False,  # keep the super-resolved grid
            pre_filter=None,
            post_filter=None,
            load_strict=True,
            config={"prompt": default_prompt, "target_spacing": "", "input_modality": "", "flip_averaging": "",
                    "intensity_scales": "", "guided_filter_radius": "", "coarse_pass": ""},
        )
        if not self.is_valid():
            raise ValueError(f"{bundle_path}: not a TUMSyn bundle (expected configs/inference.yaml, "
                             f"configs/metadata.json and models/model.pt)")
        self.default_prompt = default_prompt
        # BundleInferTask re-imports the bundle's ``scripts`` on every config access; parsing the inferer once here
        # keeps it and the engine from the same import, so the engine's Prompt objects are the inferer's.
        self.engine = importlib.import_module("scripts.inference_engine")
        self.bundle_inferer = self.bundle_config.get_parsed_content("inferer", instantiate=True)

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return []  # the engine loads and checks the image itself (NIfTI or DICOM series, orientation, NaNs)

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []  # nothing may touch the output grid

    def _get_network(self, device, data):
        """The bundle's network with its weights loaded safely (``weights_only``), one copy per device."""
        if device not in self._networks:
            network = copy.deepcopy(self.network).to(torch.device(device))
            self._networks[device] = self.engine.load_network_weights(network, self.get_path())
        return self._networks[device]

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        network = self._get_network(device, data)
        work_dir = tempfile.mkdtemp(prefix="tumsyn_label_")
        try:
            try:
                prompt = requested_prompt(data.get("prompt"), self.default_prompt)
                spacing = requested_spacing(data.get("target_spacing"))
                # checked by the engine; blank: the config's
                options = {key: None if _blank(data.get(key)) else data[key]
                           for key in ("flip_averaging", "intensity_scales", "guided_filter_radius", "coarse_pass")}
                inferer = self.bundle_inferer.with_options(**options)
                modality = None if _blank(data.get("input_modality")) else data["input_modality"]
                paths = self.engine.run_inference(data["image"], prompt, work_dir, network, spacing,
                                                  inferer=inferer, preview=False, input_modality=modality)
            except ValueError as error:  # bad input: the client gets the one-line reason, not a bare 500
                raise HTTPException(status_code=422, detail=str(error)) from None
            with open(paths["sidecar"]) as handle:
                record = json.load(handle)
            # MONAI Label sends the result file and then deletes it: move it out of the work folder.
            descriptor, result_path = tempfile.mkstemp(suffix=".nii.gz", prefix=f"{record['output_image'][:-7]}_")
            os.close(descriptor)
            shutil.move(paths["image"], result_path)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        logger.info("%s -> %s %s", data["image"], record["target_prompt"], record["output_shape"])
        data[self.output_label_key] = result_path
        data[self.output_json_key] = {key: record[key] for key in RESULT_FIELDS}
        return data

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        return data[self.output_label_key], dict(data[self.output_json_key])
