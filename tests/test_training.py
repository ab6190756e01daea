"""Training data pipeline and the stage-1/stage-2 training configs, on a tiny synthetic BIDS dataset."""

import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events

from scripts import bids_data, sr_patches, trainers
from scripts.prompt import MODALITIES

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle", "configs")
STAGE1 = os.path.join(CONFIGS, "stage1_train.yaml")
STAGE2 = os.path.join(CONFIGS, "stage2_train.yaml")
MULTI_GPU = os.path.join(CONFIGS, "multi_gpu_train.yaml")

# Tissue intensities (WM, GM, CSF) per contrast: the ordering of real scans (T1w: WM > GM > CSF, T2w: CSF brightest,
# FLAIR: CSF nulled, PD: flat), so contrasts are distinguishable the way the real ones are.
CONTRASTS = {
    "T1w": ("T1w", (1.0, 0.65, 0.2), {"RepetitionTime": 2.3, "EchoTime": 0.003, "InversionTime": 0.9, "FlipAngle": 9}),
    "T2w": ("T2w", (0.4, 0.6, 1.0), {"RepetitionTime": 3.2, "EchoTime": 0.1, "FlipAngle": 90}),
    "FLAIR": ("FLAIR", (0.55, 0.8, 0.05), {"RepetitionTime": 9.0, "EchoTime": 0.09, "InversionTime": 2.5,
                                            "FlipAngle": 150}),
    "PD": ("PDw", (0.7, 0.85, 1.0), {"RepetitionTime": 3.0, "EchoTime": 0.012, "FlipAngle": 90}),
}
SIZE = 32


def _tissues(rng, age):
    """WM/GM/CSF fractions of a blob brain whose ventricles grow with age (visible atrophy)."""
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"), -1).astype(float)
    centre = SIZE / 2 + rng.uniform(-1.5, 1.5, 3)
    radius = np.linalg.norm((grid - centre) / np.array([12.0, 13.0, 11.0]), axis=-1)
    brain = radius < 1
    ventricle = np.linalg.norm((grid - centre) / (np.array([3.0, 5.0, 2.5]) * (0.6 + age / 80)), axis=-1) < 1
    csf = brain & (ventricle | (radius > 0.85))
    wm = brain & ~csf & (radius < 0.6)
    gm = brain & ~csf & ~wm
    return wm, gm, csf


def write_bids(root, num_subjects=6, seed=0, low_res_subject=True):
    """A tiny BIDS dataset: per subject 4 truth-grid contrasts (1 mm, 32^3), plus one 4 mm axial T2w for sub-01."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "dataset_description.json"), "w") as f:
        json.dump({"Name": "tiny", "BIDSVersion": "1.8.0"}, f)
    rows = ["participant_id\tage\tsex\tsite"]
    for index in range(1, num_subjects + 1):
        subject = f"sub-{index:02d}"
        age = float(20 + 12 * index)
        rows.append(f"{subject}\t{age:g}\t{'MF'[index % 2]}\tA")
        anat = os.path.join(root, subject, "anat")
        os.makedirs(anat)
        wm, gm, csf = _tissues(rng, age)
        for suffix, (wm_value, gm_value, csf_value), sidecar in CONTRASTS.values():
            volume = wm * wm_value + gm * gm_value + csf * csf_value
            volume = (volume * (1 + 0.03 * rng.standard_normal(volume.shape)) * (wm | gm | csf)).astype(np.float32)
            stem = os.path.join(anat, f"{subject}_{suffix}")
            nib.save(nib.Nifti1Image(volume * 1000, np.eye(4)), stem + ".nii.gz")
            with open(stem + ".json", "w") as f:
                json.dump({**sidecar, "MagneticFieldStrength": 3, "Manufacturer": "Siemens"}, f)
        if low_res_subject and index == 1:
            thick = volume.reshape(SIZE, SIZE, SIZE // 4, 4).mean(-1)  # the last contrast, 4 mm slices
            affine = np.diag([1.0, 1.0, 4.0, 1.0])
            stem = os.path.join(anat, f"{subject}_acq-ax4mm_{suffix}")
            nib.save(nib.Nifti1Image(thick * 1000, affine), stem + ".nii.gz")
            with open(stem + ".json", "w") as f:
                json.dump(sidecar, f)
    with open(os.path.join(root, "participants.tsv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_bids(tmp_path_factory.mktemp("bids") / "dataset")


def _workflow(config, dataset, output_dir, **overrides):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(config_file=config, workflow_type="train", dataset_dir=dataset, output_dir=str(output_dir),
                          **overrides)


# ---------------------------------------------------------------------------------------------------- datalists


def test_scan_split_and_datalists(dataset):
    images = bids_data.scan_bids(dataset)
    assert len(images) == 6 * 4 + 1
    assert {i.modality for i in images} == {"T1w", "T2w", "FLAIR", "PD"}
    low_res = [i for i in images if not i.on_truth_grid]
    assert [os.path.basename(i.path) for i in low_res] == ["sub-01_acq-ax4mm_PDw.nii.gz"]
    assert "Modality: FLAIR" in next(i.prompt for i in images if i.modality == "FLAIR")

    subjects = [i.subject for i in images]
    train, val = bids_data.split_subjects(subjects, 0.34, seed=3)
    assert (train, val) == bids_data.split_subjects(subjects, 0.34, seed=3)
    assert not set(train) & set(val) and sorted(train + val) == sorted(set(subjects)) and len(val) == 2
    assert any(bids_data.split_subjects(subjects, 0.34, seed=s)[1] != val for s in range(4, 10))

    train1, val1 = bids_data.stage1_datalists(dataset, 0.34, seed=3)
    assert len(train1) + len(val1) == len(images)
    assert {d["subject"] for d in val1} == set(val) and not {d["subject"] for d in train1} & set(val)
    assert train1[0]["tokens"].shape == (90,)

    train2, val2 = bids_data.stage2_datalists(dataset, 0.34, seed=3)
    assert [d["subject"] for d in train2] == train and all(len(d["images"]) == 4 for d in train2)
    assert len(val2) == 2 * 4 * 3  # every ordered pair of 4 contrasts, per validation subject
    assert all("acq-" not in d["source"] + d["target"] and d["source"] != d["target"] for d in val2)
    assert all(f"Modality: {MODALITIES[d['modality']]}" in d["prompt"] for d in val2)


def test_bad_datasets_stop_with_clear_errors(tmp_path, dataset):
    with pytest.raises(ValueError, match="no such folder"):
        bids_data.scan_bids(str(tmp_path / "missing"))
    (tmp_path / "empty" / "sub-01" / "anat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        bids_data.scan_bids(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no such folder"):
        bids_data.ensure_dataset(str(tmp_path / "missing"), simulate_if_missing=False, num_subjects=2, seed=0)

    broken = write_bids(tmp_path / "broken", num_subjects=2, low_res_subject=False)
    sidecar = os.path.join(broken, "sub-02", "anat", "sub-02_T2w.json")
    with open(sidecar, "w") as f:
        json.dump({"RepetitionTime": "long"}, f)
    with pytest.raises(ValueError, match="sub-02_T2w.nii.gz: cannot build its prompt.*RepetitionTime"):
        bids_data.scan_bids(broken)
    with open(sidecar, "w") as f:
        json.dump({"Manufacturer": "Xq" * 80}, f)  # an unknown vendor word of ~80 BPE tokens
    with pytest.raises(ValueError, match="sub-02_T2w.nii.gz: its prompt is .* tokens"):
        bids_data.scan_bids(broken)


# ---------------------------------------------------------------------------------------------- patch geometry


def _ramp(shape=(40, 36, 32)):
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    return 2.0 * i + 3.0 * j + 5.0 * k + 1.0


def test_random_patches_query_the_right_target_values():
    ramp = _ramp()
    stack = np.stack([np.zeros_like(ramp), ramp])  # source 0, target the ramp (or the reverse)
    data = {"images": stack, "tokens": torch.arange(2)[:, None].repeat(1, 90), "modalities": torch.tensor([0, 1]),
            "prompts": ["a", "b"], "subject": "sub-x"}
    transform = sr_patches.RandSRPatchesd(lr_size=(6, 5, 4), num_samples=6, num_queries=300, scale_range=(1.0, 4.0))
    transform.set_random_state(seed=1)
    for sample in transform(data):
        size = sample["patch_size"].numpy()
        assert sample["image"].shape == (1, 6, 5, 4)
        assert np.all(size >= (6, 5, 4)) and np.all(size <= np.round(np.array([6, 5, 4]) * 4))
        assert torch.allclose(sample["cell"], torch.as_tensor(2.0 / size, dtype=torch.float32).expand(300, 3))
        # back from normalised coordinates to volume indices: x = (c + 1) / 2 * P - 0.5 + start
        points = (sample["coords"].double().numpy() + 1) / 2 * size - 0.5 + sample["patch_start"].numpy()
        inside = np.all((points >= 0) & (points <= np.array(ramp.shape) - 1), axis=1)
        expected = 2 * points[:, 0] + 3 * points[:, 1] + 5 * points[:, 2] + 1
        target_is_ramp = int(sample["modality"]) == 1
        assert sample["tokens"].shape == (90,) and int(sample["tokens"][0]) == int(sample["modality"])
        if target_is_ramp:
            np.testing.assert_allclose(sample["label"][inside, 0].numpy(), expected[inside], rtol=1e-5, atol=1e-3)
        else:
            assert float(sample["label"].abs().max()) == 0.0
        assert np.all(np.abs(sample["coords"].numpy()) <= 1.0)


def test_patches_are_centred_in_the_brain():
    brain = np.zeros((60, 60, 60), np.float32)
    brain[40:50, 40:50, 40:50] = 1.0  # a small brain in a corner of a large background
    data = {"images": np.stack([brain, 2 * brain]), "tokens": torch.zeros(2, 90, dtype=torch.long),
            "modalities": torch.tensor([0, 1]), "prompts": ["a", "b"], "subject": "sub-x"}
    in_brain = []
    for foreground_prob in (1.0, 0.0):
        transform = sr_patches.RandSRPatchesd(lr_size=(8, 8, 8), num_samples=40, num_queries=64, scale_range=(1, 1),
                                              anisotropic_prob=0.0, foreground_prob=foreground_prob)
        transform.set_random_state(seed=0)
        in_brain.append(np.mean([float(s["image"].max()) > 0 for s in transform(data)]))
    assert in_brain[0] == 1.0 and in_brain[1] < 0.5, in_brain


def test_slice_profiles_average_the_slab():
    rng = np.random.default_rng(0)
    volume = rng.random((16, 16, 16)).astype(np.float32)
    identity = sr_patches.PatchGeometry((2, 3, 4), (8, 8, 8), (8, 8, 8), (1.0, 1.0, 1.0))
    np.testing.assert_allclose(sr_patches.degrade(volume, identity, "box"), volume[2:10, 3:11, 4:12], atol=1e-6)

    # 4 mm slices along the last axis, box profile as thick as the spacing: the mean of each 4-voxel slab
    thick = sr_patches.PatchGeometry((0, 0, 0), (16, 16, 16), (16, 16, 4), (1.0, 1.0, 4.0))
    expected = volume.reshape(16, 16, 4, 4).mean(-1)
    np.testing.assert_allclose(sr_patches.degrade(volume, thick, "box"), expected, atol=1e-5)

    # alternating 0/1 slices: a point sample would see only one phase, a slab of 2 voxels sees their mean
    stripes = np.broadcast_to((np.arange(16) % 2).astype(np.float32), (16, 16, 16))
    two_mm = sr_patches.PatchGeometry((0, 0, 0), (16, 16, 16), (16, 16, 8), (1.0, 1.0, 2.0))
    np.testing.assert_allclose(sr_patches.degrade(stripes, two_mm, "box"), 0.5, atol=1e-6)
    # a Gaussian of FWHM 4 voxels spans several stripes: close to the mean, not to either phase
    gauss = sr_patches.PatchGeometry((8, 8, 8), (16, 16, 16), (16, 16, 4), (1.0, 1.0, 4.0))
    wide_stripes = np.pad(stripes, 8, mode="wrap")  # room for the Gaussian tails
    assert np.abs(sr_patches.degrade(wide_stripes, gauss, "gaussian") - 0.5).max() < 0.05
    weights = sr_patches.slab_weights(4, 16, 4.0, "gaussian", margin=6)
    np.testing.assert_allclose(weights.sum(1), 1.0)
    with pytest.raises(ValueError, match="slice profile"):
        sr_patches.slab_weights(4, 16, 4.0, "sinc", margin=6)


def test_validation_patch_is_fixed_and_on_the_full_grid():
    ramp = _ramp((32, 32, 32))
    item = {"source": ramp[None], "target": ramp[None], "tokens": torch.zeros(90, dtype=torch.long), "modality": 1,
            "source_modality": 0, "prompt": "p", "subject": "s"}
    transform = sr_patches.SRValidationPatchd(lr_size=(8, 8, 4), scale=(2.0, 2.0, 4.0))
    first, second = transform(item), transform(item)
    assert torch.equal(first["label"], second["label"]) and first["image"].shape == (1, 8, 8, 4)
    assert first["label"].shape == (16 ** 3, 1)
    grid = first["label"].reshape(16, 16, 16).numpy()
    start = first["patch_start"].numpy()
    np.testing.assert_allclose(grid, ramp[start[0]:start[0] + 16, start[1]:start[1] + 16, start[2]:start[2] + 16],
                               atol=1e-3)


# --------------------------------------------------------------------------------------------------- schedule


def test_warmup_then_cosine_to_zero():
    factor = trainers.warmup_cosine(warmup_steps=10, total_steps=110)
    assert factor(0) == 0.0 and factor(5) == pytest.approx(0.5) and factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5) and factor(110) == pytest.approx(0.0, abs=1e-12)
    assert factor(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    scheduler = trainers.warmup_cosine_scheduler(optimizer, 2, 4)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.0, 2.5e-4, 5e-4, 2.5e-4])
    with pytest.raises(ValueError, match="warmup_steps"):
        trainers.warmup_cosine(5, 5)


# ----------------------------------------------------------------------------------------------- the configs

STAGE2_TINY = dict(lr_size=[8, 8, 8], num_queries=512, patches_per_volume=4, batch_size=2, val_lr_size=[8, 8, 4],
                   val_scale=[2.0, 2.0, 4.0], val_fraction=0.2, val_interval=1)


def test_stage1_config_learns_retrieval_above_chance(dataset, tmp_path):
    from scripts.bmlip import load_text_encoder

    workflow = _workflow(STAGE1, dataset, tmp_path, max_epochs=40, val_fraction=0.34, device="cpu")
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    metrics = workflow.parser.get_parsed_content("validate#evaluator").state.metrics
    workflow.finalize()
    chance_top1 = 1 / 8  # 2 held-out subjects x 4 contrasts, every prompt distinct
    assert metrics["val_image_to_text_top1"] >= 2 * chance_top1, metrics
    assert metrics["val_text_to_image_top1"] >= 2 * chance_top1, metrics
    assert metrics["val_image_to_text_top5"] > 5 / 8, metrics
    assert load_text_encoder(str(tmp_path / "text_encoder.pt")).output_dim == 64
    assert os.path.isfile(tmp_path / "checkpoints" / "checkpoint_final.pt")


@pytest.fixture(scope="module")
def text_encoder_path(tmp_path_factory):
    """An untrained small text tower in the stage-1 export format (stage 2 only needs it frozen)."""
    from scripts.bmlip import build_text_encoder, save_text_encoder
    from scripts.network_scales import text_encoder_config

    path = str(tmp_path_factory.mktemp("stage1") / "text_encoder.pt")
    torch.manual_seed(0)
    save_text_encoder(build_text_encoder(text_encoder_config("small")), path, text_encoder_config("small"))
    return path


def test_stage2_config_lowers_validation_l1(dataset, tmp_path, text_encoder_path):
    workflow = _workflow(STAGE2, dataset, tmp_path, max_epochs=12, learning_rate=1e-3, device="cpu",
                         text_encoder_path=text_encoder_path, **STAGE2_TINY)
    workflow.initialize()
    assert workflow.check_properties() == []
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    untrained = dict(evaluator.state.metrics)
    workflow.run()
    trained = evaluator.state.metrics
    workflow.finalize()
    assert trained["val_l1"] < 0.6 * untrained["val_l1"], (untrained, trained)
    assert trained["val_psnr"] > untrained["val_psnr"] + 3, (untrained, trained)
    assert -1 <= trained["val_ssim"] <= 1  # computed; too short a budget to assert its gain
    assert os.path.isfile(tmp_path / "checkpoints" / "model_best.pt")
    # the exported deployable weights load into the inference config's network definition
    from scripts.inference_engine import load_network_weights
    from scripts.tumsyn_net import build_tumsyn_net

    load_network_weights(build_tumsyn_net("small", conditioning="text"), str(tmp_path / "model.pt"))


def test_stage2_onehot_trains_and_resumes_from_the_saved_epoch(dataset, tmp_path):
    first = _workflow(STAGE2, dataset, tmp_path, max_epochs=1, conditioning="onehot", device="cpu", **STAGE2_TINY)
    first.initialize()
    first.run()
    first.finalize()
    assert first.parser.get_parsed_content("network").conditioning == "onehot"
    assert os.path.isfile(tmp_path / "checkpoints" / "checkpoint_final.pt")

    second = _workflow(STAGE2, dataset, tmp_path, max_epochs=2, conditioning="onehot", device="cpu", **STAGE2_TINY)
    second.initialize()
    trainer = second.parser.get_parsed_content("train#trainer")
    epochs_run = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: epochs_run.append(engine.state.epoch))
    second.run()
    second.finalize()
    assert epochs_run == [2]  # epoch 1 came from the checkpoint
    assert trainer.state.iteration == 2 * trainer.state.epoch_length


def test_multi_gpu_overlay_runs_two_processes_on_cpu(dataset, tmp_path):
    repo = os.path.dirname(CONFIGS.rstrip("/").rsplit("/", 1)[0])
    environment = {**os.environ, "PYTHONPATH": os.path.join(repo, "bundle"), "OMP_NUM_THREADS": "1"}
    overrides = [text for k, v in STAGE2_TINY.items() for text in (f"--{k}", json.dumps(v).replace(" ", ""))]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "monai.bundle", "run", "training", "--config_file", f"['{STAGE2}','{MULTI_GPU}']",
               "--dataset_dir", dataset, "--output_dir", str(tmp_path), "--max_epochs", "1",
               "--conditioning", "onehot", *overrides]
    result = subprocess.run(command, cwd=repo, env=environment, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint_epoch=1.pt", "checkpoint_final.pt",
                                                            "model_best.pt"]
