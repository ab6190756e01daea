"""The bundle as the model zoo sees it: required files, metadata against the zoo schema, config layout."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE_ROOT, REPO_ROOT, SHIPPED_SCALE

REQUIRED = ["configs/metadata.json", "configs/logging.conf", "docs/README.md", "docs/data_license.txt"]


@pytest.mark.parametrize("relative", REQUIRED)
def test_zoo_files_exist(relative):
    assert os.path.isfile(os.path.join(BUNDLE_ROOT, relative))


def test_license_and_changelog():
    assert os.path.isfile(os.path.join(REPO_ROOT, "LICENSE"))
    with open(os.path.join(BUNDLE_ROOT, "configs", "metadata.json")) as handle:
        meta = json.load(handle)
    assert meta["version"] in meta["changelog"]
    assert {"image", "prompt"} <= set(meta["network_data_format"]["inputs"])
    assert "pred" in meta["network_data_format"]["outputs"]


def test_metadata_verifies_offline_against_the_zoo_schema(shared_dir, tmp_path):
    schema = os.path.join(shared_dir, "monai", "meta_schema_20240725.json")
    if not os.path.isfile(schema):
        pytest.skip("the model-zoo schema copy is absent")
    placed = tmp_path / "schema.json"  # verify_metadata skips the download when the file is already there
    shutil.copy(schema, placed)
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file",
         os.path.join(BUNDLE_ROOT, "configs", "metadata.json"), "--filepath", str(placed)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_metadata_versions_match_the_installed_stack():
    import monai
    import numpy
    import torch

    with open(os.path.join(BUNDLE_ROOT, "configs", "metadata.json")) as handle:
        meta = json.load(handle)
    assert meta["monai_version"] == monai.__version__
    assert torch.__version__.startswith(meta["pytorch_version"])
    assert meta["numpy_version"] == numpy.__version__


@pytest.mark.parametrize("cwd, config", [(BUNDLE_ROOT, "configs/simulate.yaml"),
                                         (REPO_ROOT, "bundle/configs/simulate.yaml")])
def test_configs_run_from_the_bundle_folder_and_the_repository_root(tmp_path, cwd, config):
    """The zoo layout (`cd bundle`, `scripts` in the current folder) and the README's (from the repository root, where
    the config's first import, the installed `tumsyn_bundle`, puts the bundle folder on sys.path)."""
    out = tmp_path / "simulated"
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--output_dir",
         str(out), "--num_subjects", "1", "--voxel_mm", "2", "--sites", "['IXI']"],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "sub-001" / "anat" / "sub-001_T1w.nii.gz").is_file()
    assert (out / "sub-001" / "anat" / "sub-001_acq-cor3p2mm_PDw.nii.gz").is_file()
    with open(out / "participants.tsv") as handle:
        assert "IXI" in handle.read()


def test_the_install_adds_no_top_level_scripts_package(tmp_path):
    """`pip install -e .` installs only `tumsyn_bundle`: a `scripts` in site-packages would collide with every other
    bundle's. Importing the launcher makes this bundle's `scripts` importable; the `tumsyn` command runs anywhere."""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    code = ("import importlib.util; print(importlib.util.find_spec('scripts'))\n"
            "import tumsyn_bundle, scripts; print(scripts.__file__)")
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True,
                           text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.split() == ["None", os.path.join(BUNDLE_ROOT, "scripts", "__init__.py")]
    command = os.path.join(os.path.dirname(sys.executable), "tumsyn")
    image = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), image)
    prompt = subprocess.run([command, "prompt", str(image)], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=120)
    assert prompt.returncode == 0, prompt.stderr[-2000:]
    assert "Modality: T2w" in prompt.stdout


@pytest.mark.parametrize("device, sw_batch_size, query_chunk", [("cpu", 1, 4096), ("cuda", 4, 65536)])
def test_engine_and_training_precision_follow_the_device(device, sw_batch_size, query_chunk):
    # A CPU keeps small decode chunks in its cache; a GPU waits on kernel launches and takes larger ones
    # (bench/README.md). Training autocast is a GPU setting: asked for on a CPU it stays off.
    import torch
    from monai.bundle import ConfigParser

    for config in ("inference", "evaluate"):  # evaluate takes the inferer of inference.yaml
        parser = ConfigParser()
        parser.read_config(os.path.join(BUNDLE_ROOT, "configs", f"{config}.yaml"))
        parser["device"] = f"$torch.device('{device}')"
        # Inference autocast by default at the paper scale only (the small network measured slower under it); larger
        # windows only where they paid: the small scale on a GPU.
        for scale in ("small", "paper"):
            parser["scale"] = scale
            settings = parser.get_parsed_content("inferer").settings
            assert (settings["sw_batch_size"], settings["query_chunk"]) == (sw_batch_size, query_chunk)
            assert settings["progress"] is (config == "inference")
            assert settings["amp"] is (scale == "paper")
            window = 96 if (device, scale) == ("cuda", "small") else 64
            assert list(settings["roi_size"]) == [window] * 3
    for stage in (1, 2):
        parser = ConfigParser()
        parser.read_config(os.path.join(BUNDLE_ROOT, "configs", f"stage{stage}_train.yaml"))
        parser.update({"device": device, "amp": "true"})
        assert parser.get_parsed_content("train#trainer#amp") == (device == "cuda")
        assert parser.get_parsed_content("train#trainer#amp_kwargs#dtype") is torch.bfloat16


def test_the_configs_default_to_the_shipped_weights_scale():
    """models/*.pt are built at SHIPPED_SCALE (the tests load them at it): every config that builds stage 2 says so."""
    from monai.bundle import ConfigParser

    for name in ("inference.yaml", "evaluate.yaml", "stage2_train.yaml"):
        parser = ConfigParser()
        parser.read_config(os.path.join(BUNDLE_ROOT, "configs", name))
        assert parser["scale"] == SHIPPED_SCALE, name
