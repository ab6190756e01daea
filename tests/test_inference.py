"""Whole-volume inference: geometry, blending, chunking, DICOM and 4D input, the config (bad inputs, batch resume
and safe loading: test_reliability.py)."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates

from conftest import SHIPPED_SCALE
from helpers import (
    FAST,
    T2W_TEMPLATE,
    SamplingNet,
    blob_volume,
    files_in,
    write_bids_image,
    write_dicom_series,
    write_nifti,
)
from scripts.data.intensity import normalize_intensity
from scripts.engine.inference_engine import INPUT_NORMALISATION, inference_cases, output_grid, run_inference
from scripts.engine.synthesis_engine import gaussian_window, synthesize_volume
from scripts.engine.volume_io import load_volume
from scripts.nets.tumsyn_net import build_tumsyn_net
from scripts.prompt import tokenize


def smooth_volume(shape, period=12.0):
    axes = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    return 1.0 + 0.3 * np.sin(axes[0] / period * 2 * np.pi) * np.cos(axes[1] / period * 2 * np.pi) + 0.02 * axes[2]


def world_centroid(path, threshold=0.5):
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float64)
    weights = np.clip(data - threshold * data.max(), 0, None)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1).reshape(-1, 3)
    centre = (index * weights.reshape(-1, 1)).sum(0) / weights.sum()
    return image.affine[:3, :3] @ centre + image.affine[:3, 3]


def rotation(axis, degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def make_affine(linear, shape, centre=(2.0, -5.0, 8.0)):
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(centre) - linear @ ((np.asarray(shape) - 1) / 2)
    return affine


AFFINES = {
    "RAS": lambda shape: make_affine(np.diag([1.0, 1.0, 1.0]), shape),
    "LPS": lambda shape: make_affine(np.diag([-1.0, -1.0, 1.0]), shape),
    "oblique_anisotropic": lambda shape: make_affine(rotation(0, 20) @ rotation(2, -15) @ np.diag([1.0, 1.5, 2.0]),
                                                     shape),
    "coronal_stored": lambda shape: make_affine(np.array([[-1.0, 0, 0], [0, 0, 2.0], [0, -1.0, 0]]), shape),
}


# ---------------------------------------------------------------------------------------------------------------
# Geometry


@pytest.mark.parametrize("shape, spacing, target, expected", [
    ((24, 24, 24), (1, 1, 1), (0.5, 0.5, 0.5), (48, 48, 48)),
    ((24, 24, 6), (1, 1, 5), (1, 1, 1), (24, 24, 30)),
    ((20, 30, 10), (1, 1, 1), (2, 3, 1), (10, 10, 10)),
    ((25, 25, 25), (0.8, 0.8, 0.8), (1, 1, 1), (20, 20, 20)),
])
def test_output_grid_shape_and_fov(shape, spacing, target, expected):
    affine = make_affine(rotation(1, 30) @ np.diag(spacing), shape)
    out_shape, out_affine = output_grid(shape, affine, target)
    assert out_shape == expected
    np.testing.assert_allclose(np.linalg.norm(out_affine[:3, :3], axis=0), target, atol=1e-9)
    for corner in ([-0.5] * 3, np.asarray(shape) - 0.5):  # outer FOV corners coincide in world space
        inner = np.asarray(corner) if corner[0] == -0.5 else np.asarray(out_shape) - 0.5
        np.testing.assert_allclose(out_affine[:3, :3] @ inner + out_affine[:3, 3],
                                   affine[:3, :3] @ np.asarray(corner) + affine[:3, 3], atol=1e-9)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_output_keeps_orientation_and_world_space(tmp_path, name):
    shape = (24, 20, 16)
    affine = AFFINES[name](shape)
    landmark = affine[:3, :3] @ np.array([13.0, 8.0, 9.0]) + affine[:3, 3]
    path = write_nifti(tmp_path / "sub-01_T1w.nii.gz", blob_volume(shape, affine, landmark), affine)
    # the same contrast (the stand-in network only resamples)
    written = run_inference(path, "T1w", str(tmp_path / "out"), SamplingNet(), target_spacing=(0.75, 0.75, 0.75),
                            inferer=FAST, preview=False)
    output = nib.load(written["image"])
    assert output.get_data_dtype() == np.float32
    assert nib.aff2axcodes(output.affine) == nib.aff2axcodes(affine)
    out_spacing = np.linalg.norm(output.affine[:3, :3], axis=0)  # 0.75 mm, rounded to tile the FOV exactly
    np.testing.assert_allclose(out_spacing, 0.75, atol=0.02)
    np.testing.assert_allclose(output.affine[:3, :3] / out_spacing,
                               affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0), atol=1e-6)
    assert np.linalg.norm(world_centroid(written["image"]) - landmark) < 0.4  # the blob's top is clipped at 1.5

    # Round trip: the output resampled back onto the input grid is the (normalised) input.
    source = normalize_intensity(np.asarray(nib.load(path).dataobj, dtype=np.float32), method=INPUT_NORMALISATION)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), 0).reshape(3, -1).astype(float)
    world = affine[:3, :3] @ index + affine[:3, 3:4]
    out_index = np.linalg.inv(output.affine[:3, :3]) @ (world - output.affine[:3, 3:4])
    back = map_coordinates(np.asarray(output.dataobj), out_index, order=1).reshape(shape)
    interior = (slice(3, -3),) * 3
    error = np.abs(back[interior] - source[interior])
    assert error.max() < 0.1 and error.mean() < 0.015  # two trilinear interpolations of a 4 mm blob


def test_sidecar_records_prompts_and_spacing(tmp_path):
    root = tmp_path / "bids"
    path = write_bids_image(str(root), "07", "T1w", blob_volume((20, 20, 20), np.eye(4), (9, 9, 9)),
                            {"RepetitionTime": 2.3, "EchoTime": 0.003, "FlipAngle": 9, "MagneticFieldStrength": 3,
                             "Manufacturer": "Siemens"}, participants=[{"participant_id": "sub-07", "age": 61,
                                                                        "sex": "F"}])
    written = run_inference(path, "FLAIR", str(tmp_path / "out"), SamplingNet(), target_spacing=2.0, inferer=FAST,
                            preview=False)
    assert os.path.basename(written["image"]) == "sub-07_T1w_FLAIR.nii.gz"
    record = json.load(open(written["sidecar"]))
    assert "Modality: T1w" in record["source_prompt"] and "Age: 61" in record["source_prompt"]
    # Age, sex and scanner come from the input's metadata; the voxel size from target_spacing.
    assert record["target_prompt"].startswith("Age: 61; Gender: F; Scanner: 3.0 Siemens; Modality: FLAIR; "
                                              "Voxel size: (2.0, 2.0, 2.0)")
    assert record["output_shape"] == [10, 10, 10]
    assert record["model_version"] and record["output_bytes"] == os.path.getsize(written["image"])


# ---------------------------------------------------------------------------------------------------------------
# Engine


@pytest.mark.parametrize("out_shape", [(45, 39, 11), (7, 13, 30), (30, 26, 22)])
def test_windows_and_slabs_reproduce_whole_volume_exactly(out_shape):
    image = torch.rand(1, 30, 26, 22)
    whole = F.interpolate(image[None], size=out_shape, mode="trilinear", align_corners=False)[0]
    windowed = synthesize_volume(SamplingNet(), image, None, out_shape, roi_size=(10, 12, 8), progress=False)
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=0)


def test_gaussian_blending_is_seam_free():
    torch.manual_seed(0)
    net = SamplingNet(conv=True)  # a local encoder: windows differ from the whole volume only by zero-padding
    image = torch.from_numpy(smooth_volume((40, 36, 32)))[None]
    whole = synthesize_volume(net, image, None, (40, 36, 32), roi_size=(64, 64, 64), progress=False)
    # Windows of 16 voxels placed as documented below (not shrunk to fit: the borders are then known).
    windowed = synthesize_volume(net, image, None, (40, 36, 32), roi_size=(16, 16, 16), overlap=0.25,
                                 fit_windows=False, progress=False)
    flat = synthesize_volume(net, image, None, (40, 36, 32), roi_size=(16, 16, 16), overlap=0.25, fit_windows=False,
                             sigma_scale=1e3, progress=False)  # equal weights: the padded window borders show
    seam, unblended = (windowed - whole).abs().max(), (flat - whole).abs().max()
    assert seam < 0.02 * (whole.max() - whole.min())
    assert unblended > 20 * seam
    # Along the first axis (window rows, slab edges) the deviation is the same at window borders as elsewhere.
    per_row = (windowed - whole).abs()[0].amax((1, 2))
    borders = [12, 15, 24, 27]  # window starts 0, 12, 24 of 16 voxels
    assert per_row[borders].max() < 1.5 * per_row[[5, 9, 19, 31]].max()


def test_gaussian_window_is_positive_and_peaked():
    weight = gaussian_window((8, 12, 16), 0.125)
    assert weight.shape == (8, 12, 16) and weight.min() > 0
    assert weight[0, 0, 0] < 1e-6 * weight.max()  # no floor: corners weigh (almost) nothing


def test_chunked_queries_equal_unchunked():
    torch.manual_seed(0)
    net = SamplingNet(conv=True)
    image = torch.rand(1, 20, 18, 16)
    one = synthesize_volume(net, image, None, (33, 30, 25), roi_size=(12, 12, 12), query_chunk=10**7, progress=False)
    many = synthesize_volume(net, image, None, (33, 30, 25), roi_size=(12, 12, 12), query_chunk=97, progress=False)
    torch.testing.assert_close(one, many, atol=1e-6, rtol=0)


def test_real_network_windows_match_whole_volume():
    torch.manual_seed(0)
    net = build_tumsyn_net("small").eval()
    image = torch.from_numpy(smooth_volume((24, 24, 24)))[None]
    tokens = tokenize(T2W_TEMPLATE)
    whole = synthesize_volume(net, image, tokens, (24, 24, 48), roi_size=(64, 64, 64), progress=False)
    windowed = synthesize_volume(net, image, tokens, (24, 24, 48), roi_size=(16, 16, 16), query_chunk=1000,
                                 progress=False)
    assert whole.shape == (1, 24, 24, 48)
    # The fusion gate pools over each window, so windows differ slightly from the whole volume; blending keeps it small.
    assert (windowed - whole).abs().mean() < 0.05 * whole.abs().mean()


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def test_dicom_series_geometry_and_source_prompt(tmp_path):
    volume = (1000 * blob_volume((16, 14, 8), np.diag([0.9, 0.9, 3.0, 1]), (7, 6, 12))).astype(np.int16)
    folder = tmp_path / "t1_series"
    write_dicom_series(str(folder), volume, spacing=(0.9, 0.9, 3.0), RepetitionTime=2300.0, EchoTime=2.98,
                       InversionTime=900.0, FlipAngle=9.0, MagneticFieldStrength=3.0, Manufacturer="SIEMENS",
                       PatientAge="045Y", PatientSex="F", SeriesDescription="t1_mprage_sag")
    loaded = load_volume(str(folder))
    np.testing.assert_array_equal(loaded.array, volume)
    np.testing.assert_allclose(loaded.affine, np.diag([-0.9, -0.9, 3.0, 1.0]), atol=1e-5)  # LPS -> RAS
    written = run_inference(str(folder), "T2w", str(tmp_path / "out"), SamplingNet(), target_spacing=(0.9, 0.9, 1.5),
                            inferer=FAST, preview=False)
    assert os.path.basename(written["image"]) == "t1_series_T2w.nii.gz"
    assert nib.load(written["image"]).shape == (16, 14, 16)
    record = json.load(open(written["sidecar"]))
    assert record["source_prompt"] == ("Age: 45; Gender: F; Scanner: 3.0 Siemens; Modality: T1w; "
                                       "Voxel size: (0.9, 0.9, 3.0); Imaging parameter TR(ms), TE(ms), TI(ms), "
                                       "and FA(degree):  (2300.0, 2.98, 900.0, 9.0)")
    assert record["target_prompt"].startswith("Age: 45; Gender: F; Scanner: 3.0 Siemens; Modality: T2w")


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float64])
def test_integer_and_double_inputs_work(tmp_path, dtype):
    data = 200 * blob_volume((16, 16, 16), np.eye(4), (8, 8, 8))
    path = write_nifti(tmp_path / "in.nii.gz", data, np.diag([1.2, 1.2, 1.2, 1.0]), dtype)
    written = run_inference(path, T2W_TEMPLATE, str(tmp_path / "out"), SamplingNet(), inferer=FAST, preview=False)
    output = np.asarray(nib.load(written["image"]).dataobj)
    assert output.dtype == np.float32 and output.shape == (19, 19, 19) and 0.9 < output.max() <= 1.5 + 1e-5


def test_background_stays_zero_and_4d_volume_index(tmp_path):
    data = np.zeros((16, 16, 16, 3), np.float32)
    data[4:12, 4:12, 4:12, 1] = 5.0 + np.arange(8)[:, None, None]
    path = write_nifti(tmp_path / "series.nii.gz", data, np.eye(4))
    written = run_inference(path, "PD", str(tmp_path / "out"), SamplingNet(), target_spacing=0.5, volume_index=1,
                            inferer=FAST, preview=False)
    output = np.asarray(nib.load(written["image"]).dataobj)
    assert output[:7].max() == 0 and output[25:].max() == 0 and output[:, :7].max() == 0
    assert output[9:23, 9:23, 9:23].min() > 0


def test_preview_with_reference(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    path = write_nifti(tmp_path / "in.nii.gz", blob_volume((20, 20, 10), affine, (10, 10, 10)), affine)
    reference = write_nifti(tmp_path / "ref.nii.gz", blob_volume((20, 20, 20), np.eye(4), (10, 10, 10)), np.eye(4))
    written = run_inference(path, "T2w", str(tmp_path / "out"), SamplingNet(), target_spacing=1.0,
                            reference=reference, inferer=FAST)
    with open(written["preview"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(written["sidecar"]))["reference"] == os.path.abspath(reference)
    assert files_in(tmp_path / "out") == ["in_T2w.json", "in_T2w.nii.gz", "in_T2w.png"]


# ---------------------------------------------------------------------------------------------------------------
# The bundle config


def test_config_runs_and_has_the_infer_properties(tmp_path, bundle_root):
    from monai.bundle import ConfigWorkflow

    ckpt = tmp_path / "model.pt"
    torch.save(build_tumsyn_net(SHIPPED_SCALE).state_dict(), ckpt)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    path = write_nifti(tmp_path / "sub-01_FLAIR.nii.gz", 300 * blob_volume((20, 20, 10), affine, (10, 10, 10)), affine)
    workflow = ConfigWorkflow(config_file=os.path.join(bundle_root, "configs", "inference.yaml"),
                              workflow_type="infer", input_image=path, prompt=T2W_TEMPLATE,
                              output_dir=str(tmp_path / "out"), ckpt_path=str(ckpt), target_spacing=[2, 2, 2],
                              roi_size=[16, 16, 16])
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()
    assert files_in(tmp_path / "out") == ["sub-01_FLAIR_T2w.json", "sub-01_FLAIR_T2w.nii.gz", "sub-01_FLAIR_T2w.png"]
    assert nib.load(str(tmp_path / "out" / "sub-01_FLAIR_T2w.nii.gz")).shape == (10, 10, 10)


def test_default_input_is_simulated_on_first_use(tmp_path, monkeypatch):
    import scripts.simulator

    calls = []

    def fake_simulate(output_dir, num_subjects, seed):
        calls.append((output_dir, num_subjects, seed))
        for name in ("sub-000_acq-ax5mm_T1w", "sub-000_T1w", "sub-000_ce-gadolinium_T1w"):
            write_bids_image(output_dir, "000", name.split("_", 1)[1], np.ones((4, 4, 4)), {})

    monkeypatch.setattr(scripts.simulator, "simulate", fake_simulate)
    dataset = str(tmp_path / "simulated")
    case = inference_cases(None, T2W_TEMPLATE, None, None, None, dataset)[0]
    assert case["input_image"] == os.path.join(dataset, "sub-000", "anat", "sub-000_T1w.nii.gz")
    inference_cases(None, T2W_TEMPLATE, None, None, None, dataset)
    assert calls == [(dataset, 1, 1000)]  # held-out seed; the second run finds the dataset


def test_command_line_contract(tmp_path, bundle_root):
    """`python -m monai.bundle run` exactly as users type it (the bundle folder joins sys.path only in `run`)."""
    torch.save(build_tumsyn_net(SHIPPED_SCALE).state_dict(), tmp_path / "model.pt")
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    path = write_nifti(tmp_path / "scan.nii.gz", 300 * blob_volume((16, 16, 8), affine, (8, 8, 8)), affine)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
               os.path.join(bundle_root, "configs", "inference.yaml"), "--input_image", path, "--prompt",
               "FLAIR; Age: 70", "--target_spacing", "[2, 2, 2]", "--output_dir", str(tmp_path / "out"),
               "--ckpt_path", str(tmp_path / "model.pt"), "--input_modality", "T1w"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(bundle_root), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.load(open(tmp_path / "out" / "scan_FLAIR.json"))
    assert record["target_prompt"].startswith("Age: 70; Gender: None; Scanner: None; Modality: FLAIR; "
                                              "Voxel size: (2.0, 2.0, 2.0)")
    assert nib.load(str(tmp_path / "out" / "scan_FLAIR.nii.gz")).shape == (8, 8, 8)
    # a plain file name says no contrast: --input_modality does
    assert record["input_modality"] == "T1w"
    assert record["mirror_images_averaged"] == 1


def test_no_argument_run_writes_image_and_preview(bundle_root):
    """`make demo`: the embedded default (simulated subject, shipped weights). The longest test: synthesising its
    157x193x167 mm head at 1 mm takes ~20 CPU-seconds (bench/README.md) plus the preview and the process start;
    it runs beside the rest under -n 2."""
    if not os.path.isfile(os.path.join(bundle_root, "models", "model.pt")):
        pytest.skip("bundle/models/model.pt is not trained yet")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
               os.path.join(bundle_root, "configs", "inference.yaml")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(bundle_root), timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    out = os.path.join(bundle_root, "output", "inference")
    written = [name for name in files_in(out) if name.endswith("_T2w.nii.gz")]
    assert written and os.path.isfile(os.path.join(out, written[0].replace(".nii.gz", ".png")))


def test_default_case_synthesizes_the_subjects_t2w_with_its_own_prompt(tmp_path, monkeypatch):
    import scripts.simulator

    def fake_simulate(output_dir, num_subjects, seed):
        write_bids_image(output_dir, "001", "T1w", np.ones((4, 4, 4)), {"RepetitionTime": 2.3})
        write_bids_image(output_dir, "001", "T2w", np.ones((4, 4, 4)), {"RepetitionTime": 4.0, "EchoTime": 0.1})

    monkeypatch.setattr(scripts.simulator, "simulate", fake_simulate)
    dataset = str(tmp_path / "demo")
    case = inference_cases(None, None, None, None, None, dataset)[0]
    t2w = os.path.join(dataset, "sub-001", "anat", "sub-001_T2w.nii.gz")
    assert case["reference"] == t2w
    assert "Modality: T2w" in case["prompt"] and "(4000.0, 100.0, None, None)" in case["prompt"]
    with pytest.raises(ValueError, match="prompt"):
        inference_cases(case["input_image"], None, None, None, None, dataset)


def test_flip_averaging_keeps_every_voxel_in_place_on_an_oblique_grid(tmp_path):
    """A network that only resamples its input is mirror-symmetric, so averaging its 8 mirror predictions must give
    its single prediction back on any input orientation and output grid: a mirror image flipped back onto the wrong
    voxels would blur the blob. The sidecar records how many mirror images were averaged."""
    from scripts.engine.synthesis_engine import TUMSynInferer

    affine = np.array([[-1.2, 0, 0, 30.0], [0, 0, 2.0, -10.0], [0, -0.9, 0, 20.0], [0, 0, 0, 1]])  # LPS-like, permuted
    data = (300 * blob_volume((18, 14, 11), affine, (22.0, 5.0, 12.0))).astype(np.float32)
    image = write_nifti(tmp_path / "oblique.nii.gz", data, affine)
    results = {}
    for flips in (False, True):
        inferer = TUMSynInferer(roi_size=(8, 8, 8), progress=False, flip_averaging=flips)
        written = run_inference(image, "T2w", str(tmp_path / f"out_{flips}"), SamplingNet(),
                                target_spacing=[0.7, 1.3, 1.1], inferer=inferer, preview=False)
        results[flips] = np.asarray(nib.load(written["image"]).dataobj)
        sidecar = json.load(open(written["sidecar"]))
        assert sidecar["mirror_images_averaged"] == (8 if flips else 1)
    assert results[True].std() > 0.1
    np.testing.assert_allclose(results[True], results[False], atol=1e-5)


def test_input_modality_is_read_from_the_metadata_or_given(tmp_path):
    """The input's contrast comes from its BIDS name (or sidecar), or from ``input_modality``, which overrides it;
    the sidecar records it (an input of unknown contrast gets a warning)."""
    from scripts.engine.synthesis_engine import TUMSynInferer

    data = (300 * blob_volume((12, 12, 10), np.eye(4), (5.0, 6.0, 4.0))).astype(np.float32)
    inferer = TUMSynInferer(roi_size=(8, 8, 8), progress=False)
    cases = {("sub-01_T1w.nii.gz", None): "T1w", ("plain.nii.gz", None): None, ("plain.nii.gz", "t1gd"): "T1CE",
             ("sub-01_T1w.nii.gz", "T2w"): "T2w"}
    for number, ((name, given), expected) in enumerate(cases.items()):
        image = write_nifti(tmp_path / name, data, np.eye(4))
        written = run_inference(image, "T2w", str(tmp_path / f"out{number}"), SamplingNet(), inferer=inferer,
                                preview=False, input_modality=given)
        sidecar = json.load(open(written["sidecar"]))
        assert sidecar["input_modality"] == expected, (name, given)
        unknown = [warning for warning in sidecar["warnings"] if warning.startswith("the input's contrast is unknown")]
        assert bool(unknown) == (expected is None), sidecar["warnings"]
    with pytest.raises(ValueError, match=r"^input_modality: expected one of T1w, .*got 'T3w'$"):
        run_inference(image, "T2w", str(tmp_path / "refused"), SamplingNet(), inferer=inferer, input_modality="T3w")
    assert not os.path.exists(tmp_path / "refused")
