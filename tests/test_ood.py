"""Out-of-distribution warnings: each fires on a crafted input and stays silent on an in-distribution one."""

import json
import logging

import nibabel as nib
import numpy as np
import pytest

from conftest import MODEL, SHIPPED_SCALE
from scripts.engine.ood import ood_warnings, trained_parameter_ranges, trained_voxel_range
from scripts.engine.volume_io import Volume
from scripts.prompt import Prompt


def brain(voxel_mm=(2.0, 2.0, 2.0), shape=(96, 110, 84), semi_axes_mm=(65.0, 80.0, 60.0), seed=0) -> Volume:
    """A skull-stripped brain-sized ellipsoid: WM core, GM shell, CSF rim, mild noise, zero background."""
    rng = np.random.default_rng(seed)
    axes = [(np.arange(n) - (n - 1) / 2) * s / a for n, s, a in zip(shape, voxel_mm, semi_axes_mm)]
    radius = np.sqrt(sum(g**2 for g in np.meshgrid(*axes, indexing="ij")))
    tissue = np.where(radius < 0.7, 0.9, np.where(radius < 0.9, 0.6, 0.25))
    image = (tissue + rng.normal(0, 0.03, shape)) * (radius < 1.0) * 1000
    return Volume(image.astype(np.float32), np.diag([*voxel_mm, 1.0]), "crafted.nii.gz")


T2W = Prompt("T2w", voxel_size=(1.0, 1.0, 1.0), tr=4000.0, te=100.0, field_strength=3.0, age=50)


def test_silent_on_an_in_distribution_input():
    assert ood_warnings(brain(), T2W) == []
    assert ood_warnings(brain(), Prompt("T2w")) == []  # unknown (None) fields are never out of range


@pytest.mark.parametrize("volume, expected", [
    (brain(voxel_mm=(1.0, 1.0, 8.0), shape=(130, 160, 15)), "slice thickness"),
    (brain(voxel_mm=(0.3, 0.3, 0.3), shape=(120, 120, 120), semi_axes_mm=(15, 15, 15)), "voxel size"),
    (brain(voxel_mm=(2.0, 2.0, 2.0), shape=(96, 110, 20)), "field of view"),
    (brain(voxel_mm=(2.0, 2.0, 2.0), shape=(180, 180, 84), semi_axes_mm=(170.0, 170.0, 60.0)), "field of view"),
])
def test_geometry_warnings(volume, expected):
    assert any(expected in w for w in ood_warnings(volume)), ood_warnings(volume)


def test_whole_head_warning():
    head = brain()
    rng = np.random.default_rng(1)
    head.array[head.array == 0] = rng.uniform(5, 50, int((head.array == 0).sum()))  # noisy air, no zero background
    assert any("whole head" in w for w in ood_warnings(head))


def test_histogram_warning():
    odd = brain()
    inside = odd.array > 0
    odd.array[inside] = np.random.default_rng(2).exponential(1.0, int(inside.sum())) + 1e-3  # no tissue peaks
    assert any("histogram" in w for w in ood_warnings(odd))


def test_prompt_warnings_name_the_field(caplog):
    with caplog.at_level(logging.WARNING, logger="scripts.engine.ood"):
        found = ood_warnings(brain(), T2W.replace(te=400.0, age=120, field_strength=7.0))
    assert any("TE 400" in w and "T2w" in w for w in found)
    assert any("age 120" in w for w in found) and any("7 T" in w for w in found)
    assert all(len(record.getMessage().splitlines()) == 1 for record in caplog.records)
    assert len(caplog.records) == len(found)
    low, high = trained_parameter_ranges("FLAIR")["ti"]
    assert low < 2500 < high and trained_voxel_range()[1] >= 5.0  # ranges follow the training presets


def test_same_contrast_target_warning():
    found = ood_warnings(brain(), T2W, source_modality="T2w")
    assert len(found) == 1 and "T2w is the input's own contrast" in found[0]
    assert ood_warnings(brain(), T2W, source_modality="T1w") == []
    assert ood_warnings(brain(), T2W) == []  # the input's contrast unknown: nothing to compare


def test_post_contrast_target_from_a_pre_contrast_input_warning():
    t1ce = Prompt("T1CE", voxel_size=(1.0, 1.0, 1.0))  # unknown parameters, as on the real cases
    for source in ("T1w", "FLAIR"):
        found = ood_warnings(brain(), t1ce, source_modality=source)
        assert len(found) == 1 and found[0].startswith(f"target T1CE from a pre-contrast {source}:"), found
    found = ood_warnings(brain(), t1ce, source_modality="T1CE")
    assert len(found) == 1 and "own contrast" in found[0]  # the own-contrast warning instead
    assert ood_warnings(brain(), t1ce) == []  # unknown input: it may be post-contrast itself


def test_end_to_end_prompt_with_none_fields_records_warnings(tmp_path):
    import torch

    from scripts.engine.inference_engine import load_network_weights, run_inference
    from scripts.engine.synthesis_engine import TUMSynInferer
    from scripts.nets.tumsyn_net import build_tumsyn_net

    torch.set_num_threads(1)
    volume = brain(voxel_mm=(4.0, 4.0, 4.0), shape=(40, 44, 34))
    path = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(volume.array, volume.affine), path)
    network = load_network_weights(build_tumsyn_net(scale=SHIPPED_SCALE, conditioning="text"), MODEL).eval()
    prompt = "Age: None; Gender: None; Scanner: None; Modality: FLAIR; Voxel size: (4, 4, 4); " \
             "Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (None, None, None, None)"
    paths = run_inference(str(path), prompt, str(tmp_path / "out"), network,
                          inferer=TUMSynInferer(roi_size=(48, 48, 48), progress=False), preview=False)
    record = json.loads(open(paths["sidecar"]).read())
    assert record["ood_warnings"] == []
    assert nib.load(paths["image"]).shape == (40, 44, 34)
    # the same input asked for its own contrast (read from its BIDS name): recorded in the sidecar
    paths = run_inference(str(path), "T1w", str(tmp_path / "same"), network,
                          inferer=TUMSynInferer(roi_size=(48, 48, 48), progress=False), preview=False)
    warnings = json.loads(open(paths["sidecar"]).read())["ood_warnings"]
    assert len(warnings) == 1 and "T1w is the input's own contrast" in warnings[0]
