"""MONAI Label infer task: the picked image + a target prompt -> TUMSyn's synthesized volume.

The stock bundle task resamples every prediction back onto the input grid (``add_post_restore``), which would
undo super-resolution; this task returns the bundle's own output grid (the input's field of view at the requested
voxel size, its affine in the input's world space) instead. The work is ``lib.synthesis.Synthesis`` (no monailabel
there, so it is tested without a server); this class is its MONAI Label face.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

from lib.synthesis import OPTION_DEFAULTS, Synthesis

logger = logging.getLogger(__name__)


class TUMSynSynthesis(BundleInferTask):
    """Text-guided synthesis / super-resolution of the picked image; request params as ``lib.synthesis.Synthesis``
    reads them (``prompt``, ``target_spacing``, ``input_modality`` and the bundle inferer's test-time options)."""

    def __init__(self, bundle_path: str, conf: dict[str, str], default_prompt: str = "T2w"):
        super().__init__(
            bundle_path,
            conf,
            type=InferType.OTHERS,
            add_post_restore=False,  # keep the super-resolved grid
            pre_filter=None,
            post_filter=None,
            load_strict=True,
            config={"prompt": default_prompt, **OPTION_DEFAULTS},
        )
        if not self.is_valid():
            raise ValueError(f"{bundle_path}: not a TUMSyn bundle (expected configs/inference.yaml, "
                             f"configs/metadata.json and models/model.pt)")
        self.synthesis = Synthesis(self.bundle_config, self.network, self.get_path(), default_prompt)

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return []  # the engine loads and checks the image itself (NIfTI or DICOM series, orientation, NaNs)

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []  # nothing may touch the output grid

    def _get_network(self, device, data):
        return self.synthesis.network_on(device)

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        self._get_network(device, data)  # outside the request's errors: bad weights are the server's fault, a 500
        try:
            result_path, params = self.synthesis(data["image"], data, device)
        except ValueError as error:  # bad input: the client gets the one-line reason, not a bare 500
            raise HTTPException(status_code=422, detail=str(error)) from None
        logger.info("%s -> %s %s", data["image"], params["target_prompt"], params["output_shape"])
        data[self.output_label_key] = result_path
        data[self.output_json_key] = params
        return data

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        return data[self.output_label_key], dict(data[self.output_json_key])
