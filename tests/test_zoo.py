"""What the model-zoo CI checks on the inference config and the shipped weights."""

import os

import torch
from monai.bundle import ConfigWorkflow, ckpt_export, verify_net_in_out

from conftest import BUNDLE_ROOT

CONFIG = os.path.join(BUNDLE_ROOT, "configs", "inference.yaml")
META = os.path.join(BUNDLE_ROOT, "configs", "metadata.json")
MODEL = os.path.join(BUNDLE_ROOT, "models", "model.pt")


def test_inference_config_has_the_required_properties():
    workflow = ConfigWorkflow(config_file=CONFIG, workflow_type="infer")
    workflow.initialize()
    assert workflow.check_properties() == []


def test_network_def_accepts_the_image_alone():
    verify_net_in_out(net_id="network_def", meta_file=META, config_file=CONFIG, n=2, device="cpu")


def test_checkpoint_exports_to_torchscript_with_the_same_output(tmp_path):
    exported = str(tmp_path / "model.ts")
    ckpt_export(net_id="network_def", filepath=exported, ckpt_file=MODEL, meta_file=META, config_file=CONFIG)
    scripted = torch.jit.load(exported)
    workflow = ConfigWorkflow(config_file=CONFIG, workflow_type="infer")
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(MODEL, map_location="cpu", weights_only=True))
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(scripted(image), network.eval()(image), rtol=1e-4, atol=1e-5)
