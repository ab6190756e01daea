"""What the model-zoo CI checks on the inference config and the shipped weights."""

import json
import os

import numpy as np
import pytest
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
    from scripts.prompt import tokenize

    tokens = tokenize(["Age: 70; Gender: M; Scanner: 3.0 Siemens; Modality: FLAIR; Voxel size: (1.0, 1.0, 1.0); "
                       "Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (9000.0, 100.0, 2500.0, 150.0)"])
    with torch.no_grad():
        default_prompt = network.eval()(image)
        torch.testing.assert_close(scripted(image), default_prompt, rtol=1e-4, atol=1e-5)
        flair = network(image, tokens)
        torch.testing.assert_close(scripted(image, tokens), flair, rtol=1e-4, atol=1e-5)
    assert (flair - default_prompt).abs().max() > 1e-3  # the prompt input reaches the scripted graph


def test_onnx_export_matches_eager_in_onnxruntime(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from scripts.engine.export import export_onnx

    workflow = ConfigWorkflow(config_file=CONFIG, workflow_type="infer")
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(MODEL, map_location="cpu", weights_only=True))
    path = export_onnx(network.train(), str(tmp_path / "model.onnx"), window=(16, 16, 16))
    assert network.training  # exported in eval mode, the caller's mode restored
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    torch.manual_seed(0)
    for _ in range(2):  # the graph is not specialised to the traced values
        image = torch.rand(1, 1, 16, 16, 16)
        with torch.no_grad():
            expected = network.eval()(image).numpy()
        (result,) = session.run(None, {"image": image.numpy()})
        np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="window"):
        export_onnx(network, str(tmp_path / "bad.onnx"), window=(16, 16))


def test_packaging_requires_a_changelog_entry_for_the_version(tmp_path):
    from scripts.packaging import build_zoo_archive

    (tmp_path / "configs").mkdir()
    metadata = {"name": "x", "version": "0.2.0", "changelog": {"0.1.0": "first"}}
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="version '0.2.0' has no entry in 'changelog'"):
        build_zoo_archive(str(tmp_path / "dist"), bundle_root=str(tmp_path))
    assert not (tmp_path / "dist").exists()


# ------------------------------------------------------------------------------------- the zoo archive round trip


def test_packaged_archive_installs_through_monai_download_and_runs_inference(tmp_path):
    import zipfile

    import nibabel as nib
    from monai.bundle import download

    from scripts.packaging import build_zoo_archive, read_release

    name, version = read_release()
    archive = build_zoo_archive(str(tmp_path / "dist"))
    assert os.path.basename(archive) == f"{name}_v{version}.zip"
    members = zipfile.ZipFile(archive).namelist()
    assert {m.split("/")[0] for m in members} == {name}  # one top folder, named after the bundle
    for required in ("configs/inference.yaml", "configs/metadata.json", "models/model.pt", "scripts/__init__.py",
                     "docs/README.md", "LICENSE"):
        assert f"{name}/{required}" in members
    # the bundle's datasets and outputs stay out (scripts/data/ is code)
    assert not [m for m in members if m.startswith((f"{name}/output/", f"{name}/data/")) or "__pycache__" in m
                or m.endswith(".pyc")]

    # what `python -m monai.bundle download --name NAME --bundle_dir DIR --url file://ZIP` calls
    download(name=name, bundle_dir=str(tmp_path / "installed"), url=f"file://{archive}")
    copy = tmp_path / "installed" / name
    image = tmp_path / "input.nii.gz"
    volume = np.zeros((16, 16, 16), np.float32)
    volume[4:12, 3:13, 5:11] = 500.0
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), image)
    workflow = ConfigWorkflow(config_file=str(copy / "configs" / "inference.yaml"), workflow_type="infer",
                              bundle_root=str(copy), input_image=str(image), prompt="T2w",
                              target_spacing=[2.0, 2.0, 2.0], output_dir=str(tmp_path / "out"), device="cpu")
    workflow.initialize()
    assert workflow.parser.get_parsed_content("ckpt_path") == str(copy / "models" / "model.pt")
    workflow.run()
    workflow.finalize()
    result = nib.load(tmp_path / "out" / "input_T2w.nii.gz")
    assert result.shape == (16, 16, 16)
    np.testing.assert_allclose(result.affine, np.diag([2.0, 2.0, 2.0, 1.0]), atol=1e-4)
    data = np.asarray(result.dataobj)
    assert np.isfinite(data).all() and data[6:10, 6:10, 6:10].mean() > data[0:2, 0:2, 0:2].mean()


# ---------------------------------------------------------------------------------------- experiment tracking


@pytest.mark.parametrize("stage", ["stage1_train.yaml", "stage2_train.yaml"])
def test_training_configs_log_to_tensorboard_and_take_monai_mlflow_tracking(stage, tmp_path):
    """TensorBoard is built in (``EngineLogs``); `--tracking mlflow` (MONAI's patch, mlflow itself an optional extra)
    adds its handlers to both engines, disabled on ranks > 0 like every other logging handler."""
    config = os.path.join(BUNDLE_ROOT, "configs", stage)
    workflow = ConfigWorkflow(config_file=config, workflow_type="train", tracking="mlflow", output_dir=str(tmp_path))
    for engine in ("train", "validate"):
        targets = [handler["_target_"] for handler in workflow.parser[f"{engine}#handlers"]]
        assert "scripts.train.trainers.EngineLogs" in targets and targets[-1] == "MLFlowHandler", targets
        assert workflow.parser[f"{engine}#handlers"][-1]["_disabled_"] == "@is_not_rank0"
    assert workflow.parser.get_parsed_content("is_not_rank0") is False  # one process: rank 0
    assert workflow.parser.get_parsed_content("tracking_uri").endswith(f"{tmp_path}/mlruns.db")
    assert [name for name in os.listdir(tmp_path) if name.startswith("config_")]  # the executed config, logged
