"""Test-wide setup: make the bundle's ``scripts`` package importable the way ``monai.bundle run`` does."""

import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_ROOT = os.path.join(REPO_ROOT, "bundle")
SHARED_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared")
if BUNDLE_ROOT not in sys.path:
    sys.path.insert(0, BUNDLE_ROOT)
# the research tools of bench/ (sim_vs_real, intensity_landmarks) are tested here as plain modules
sys.path.append(os.path.join(REPO_ROOT, "bench"))
# The shipped weights (models/*.pt) and the network size they are built at: the inference config's default scale.
MODELS_DIR = os.path.join(BUNDLE_ROOT, "models")
MODEL = os.path.join(MODELS_DIR, "model.pt")
SHIPPED_SCALE = "unet"

# Two cores are shared by every test: one intra-op thread keeps timings stable and avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def bundle_root():
    return BUNDLE_ROOT


@pytest.fixture(scope="session")
def shared_dir():
    if not os.path.isdir(SHARED_DIR):
        pytest.skip("../shared is absent")
    return SHARED_DIR
