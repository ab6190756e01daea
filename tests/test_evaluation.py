"""The evaluate config with the shipped weights on two held-out simulated subjects: measured quality thresholds."""

import csv
import os

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE_ROOT
from scripts.engine.evaluation import (
    TASK_SPECIFIC,
    TASKS,
    baseline_table,
    bids_image,
    load_methods,
    resample_to,
    tasks_named,
    truth_tissue_volumes,
)
from scripts.engine.volume_io import save_nifti
from scripts.nets.tumsyn_net import build_tumsyn_net

MODEL = os.path.join(BUNDLE_ROOT, "models", "model.pt")
CONFIG = os.path.join(BUNDLE_ROOT, "configs", "evaluate.yaml")
# One training-site task, one joint super-resolution task, two zero-shot tasks (a TE outside every training range),
# on a 2 mm held-out subject of each site, with the config's defaults (intensity_scales auto, guided_filter_radius 1).
# Per task: the shipped model's minimum PSNR (dB), set from the measured value
# (docs/small_model_measurements.md: 19.60, 15.74, 15.74, 9.38) minus 1.5 dB, and the measure on which it must beat
# the identity baseline (for the super-resolution task PSNR does not: the model card says so).
THRESHOLDS = {"T2w->FLAIR": (18.1, "psnr"), "cor3.2mm PD->T1w": (14.2, "ssim"), "T1w->PD (unseen TE)": (14.2, "psnr"),
              "T1w->T2w (unseen TE)": (7.9, "psnr")}
# The shipped one-hot ablation (models/model_onehot.pt), measured 17.00, 18.17, 16.27 dB on the same tasks, minus 1.5.
ONEHOT_MINIMUM_PSNR = {"T2w->FLAIR": 15.5, "cor3.2mm PD->T1w": 16.6, "T1w->PD (unseen TE)": 14.7}
# The shipped task-specific models (models/model_task_T2w-FLAIR.pt, model_task_T1w-T2w.pt), measured 17.35 and
# 8.14 dB on these rows (14.22 and 10.87 at the input's own scale, unguided: the auto factors were chosen for the text
# model), minus 1.5.
TASK_SPECIFIC_MINIMUM_PSNR = {"T2w->FLAIR": 15.8, "T1w->T2w (unseen TE)": 6.6}
EVALUATED_TASKS = list(dict.fromkeys([*THRESHOLDS, *TASK_SPECIFIC_MINIMUM_PSNR]))


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    if not os.path.isfile(MODEL):
        pytest.fail(f"{MODEL} is missing: the shipped weights are part of the bundle")
    root = tmp_path_factory.mktemp("evaluation")
    workflow = ConfigWorkflow(config_file=CONFIG, workflow_type=None, dataset_dir=str(root / "data"),
                              output_dir=str(root / "out"), simulate_voxel_mm=2, tasks=EVALUATED_TASKS,
                              **{"simulate_sites": ["clinical", "unseen-params"]})
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    with open(root / "out" / "metrics.csv") as handle:
        return root, list(csv.DictReader(handle))


def test_writes_every_output(evaluation):
    root, rows = evaluation
    for name in ("metrics.csv", "summary.csv", "metrics.md", "metrics.png"):
        assert os.path.getsize(root / "out" / name) > 0
    assert {row["task"] for row in rows} == set(EVALUATED_TASKS)
    assert {row["method"] for row in rows} >= {"tumsyn", "onehot", TASK_SPECIFIC, "identity"}
    # a task-specific model runs on the cases of its own (source, target) pair only; the table marks the others
    assert {row["task"] for row in rows if row["method"] == TASK_SPECIFIC} == set(TASK_SPECIFIC_MINIMUM_PSNR)
    rows_of_table = [line for line in (root / "out" / "metrics.md").read_text().splitlines() if line.startswith("| ")]
    without = {line.split(" | ")[0][2:] for line in rows_of_table if " - | - | - " in line}
    assert without == set(EVALUATED_TASKS) - set(TASK_SPECIFIC_MINIMUM_PSNR), rows_of_table


@pytest.mark.parametrize("task", list(THRESHOLDS))
def test_shipped_model_meets_its_measured_quality(evaluation, task):
    _, rows = evaluation
    scores = {row["method"]: row for row in rows if row["task"] == task}
    minimum_psnr, beats_identity_on = THRESHOLDS[task]
    assert float(scores["tumsyn"]["psnr"]) > minimum_psnr, scores
    assert float(scores["tumsyn"][beats_identity_on]) > float(scores["identity"][beats_identity_on]), scores


def test_baseline_table_counts_cases_above_the_inputs_magnitude():
    def row(subject, method, r):
        return {"site": "", "subject": subject, "task": "T1w->T2w", "method": method, "pearson": r}

    rows = [row("a", "tumsyn", 0.5), row("a", "identity", -0.4), row("a", "oracle-lut", 0.6),
            row("b", "tumsyn", 0.3), row("b", "identity", -0.35), row("b", "oracle-lut", 0.5)]
    # an inverted input counts by magnitude: case a is above (0.5 > 0.4), case b below (0.3 < 0.35)
    assert "| T1w->T2w | tumsyn | 1 of 2 | +0.025 | -0.150 |" in baseline_table(rows)
    without_lut = [r for r in rows if r["method"] != "oracle-lut"]
    assert "| T1w->T2w | tumsyn | 1 of 2 | +0.025 | - |" in baseline_table(without_lut)
    assert baseline_table([r for r in rows if r["method"] != "identity"]) == ""


def test_task_names_and_errors():
    assert tasks_named(None) == TASKS
    with pytest.raises(ValueError, match="unknown"):
        tasks_named(["T1w->nothing"])
    expected = "sub-001/anat/sub-001_acq-ax5mm_ce-gadolinium_T1w.nii.gz"
    assert bids_image("/d", "sub-001", "T1CE", "ax5mm").endswith(expected)


def test_resampling_maps_world_space():
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    # a 1 mm grid whose voxel (2k, 2l, 2m) is the world point of the 2 mm voxel (k, l, m)
    fine = resample_to(image, affine, (8, 10, 12), np.diag([1.0, 1.0, 1.0, 1.0]))
    np.testing.assert_allclose(fine[::2, ::2, ::2], image, atol=1e-5)


def test_downstream_tissue_volumes_against_the_simulator_truth(evaluation):
    """T1w targets get the paper's Table 2 check: k-means tissue volumes of every method's image against the real
    image and against the simulator's truth, beside the real image's own error (44.2 % measured on this 2 mm
    subject: hard k-means classes against partial-volume truth)."""
    root, rows = evaluation
    t1w_rows = [row for row in rows if row["task"] == "cor3.2mm PD->T1w"]
    assert {row["method"] for row in t1w_rows} >= {"tumsyn", "onehot", "identity"}
    for row in t1w_rows:
        assert 0.0 <= float(row["truth_volume_error_pct"]) < 200.0, row
        assert float(row["real_truth_volume_error_pct"]) < 50.0, row
    assert all(row["truth_volume_error_pct"] == "" for row in rows if row["task"] == "T2w->FLAIR")
    assert "Downstream (paper Table 2)" in (root / "out" / "metrics.md").read_text()


def test_truth_tissue_volumes_sum_the_simulator_maps(tmp_path):
    anat = tmp_path / "anat"
    anat.mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 8 mL voxels
    fractions = np.random.default_rng(0).dirichlet(np.ones(4), size=(4, 4, 4)).astype(np.float32)
    labels = ("CSF", "GM", "deepGM", "WM")  # no WMH map: a subject without lesions
    for k, label in enumerate(labels):
        save_nifti(fractions[..., k], affine, str(anat / f"sub-1_label-{label}_probseg.nii.gz"))
    mask = np.zeros((4, 4, 4), bool)
    mask[:2] = True
    volumes = truth_tissue_volumes(str(anat / "sub-1_desc-brain_mask.nii.gz"), (4, 4, 4), affine, mask, 0.008)
    inside = fractions[mask].sum(axis=0) * 0.008
    np.testing.assert_allclose(volumes, [inside[0], inside[1] + inside[2], inside[3]], rtol=1e-5)
    (anat / "sub-1_label-CSF_probseg.nii.gz").unlink()
    assert truth_tissue_volumes(str(anat / "sub-1_desc-brain_mask.nii.gz"), (4, 4, 4), affine, mask, 0.008) is None


@pytest.mark.parametrize("task", list(ONEHOT_MINIMUM_PSNR))
def test_shipped_onehot_ablation_meets_its_measured_quality(evaluation, task):
    """The baseline is a trained model too: a regression in it would silently flatter the text-conditioned one."""
    _, rows = evaluation
    (onehot,) = [row for row in rows if row["task"] == task and row["method"] == "onehot"]
    assert float(onehot["psnr"]) > ONEHOT_MINIMUM_PSNR[task], onehot


@pytest.mark.parametrize("task", list(TASK_SPECIFIC_MINIMUM_PSNR))
def test_shipped_task_specific_baselines_meet_their_measured_quality(evaluation, task):
    _, rows = evaluation
    (specific,) = [row for row in rows if row["task"] == task and row["method"] == TASK_SPECIFIC]
    assert float(specific["psnr"]) > TASK_SPECIFIC_MINIMUM_PSNR[task], specific


@pytest.mark.parametrize("override, skip", [(None, True), ("false", False), ("true", True)])
def test_every_evaluated_network_follows_the_input_skip_override(override, skip):
    """Weights trained with another decoder (a paper-scale run with the skip, version 0.1.0 small weights without)
    are evaluated by passing --network_def#input_skip: the text, one-hot and task-specific networks all follow it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(CONFIG)
    if override is not None:
        parser["network_def#input_skip"] = override
    channels = 16 + int(skip)  # the small encoder's width, plus the input
    for conditioning in ("text", "onehot"):
        network = parser.get_parsed_content("build_network")(conditioning)
        assert network.decoder.unfold_projection.in_channels == channels, conditioning


def test_task_specific_models_load_for_their_pair_only(tmp_path, caplog):
    weights = str(tmp_path / "t2w_to_flair.pt")
    torch.save(build_tumsyn_net("small", conditioning="onehot").state_dict(), weights)
    models = {"T2w->FLAIR": weights, "T1w->T2w": str(tmp_path / "missing.pt")}
    methods = load_methods(lambda conditioning: build_tumsyn_net("small", conditioning=conditioning), MODEL, None,
                           models)
    assert [m.name for m in methods] == ["tumsyn", TASK_SPECIFIC, "identity", "oracle-lut"]
    assert "missing.pt not found" in caplog.text
    assert [t.name for t in TASKS if methods[1].applies_to(t)] == ["T2w->FLAIR"]
    assert all(methods[0].applies_to(t) for t in TASKS)
    with pytest.raises(ValueError, match="^task_models: expected 'source->target' .* got 'T2w->Flair'"):
        load_methods(lambda conditioning: None, MODEL, None, {"T2w->Flair": weights})
    # The command line passes null as a word: no task-specific models; anything else that is not a mapping is refused.
    methods = load_methods(lambda conditioning: build_tumsyn_net("small", conditioning=conditioning), MODEL, None,
                           "null")
    assert [m.name for m in methods] == ["tumsyn", "identity", "oracle-lut"]
    with pytest.raises(ValueError, match="^task_models: expected a mapping .* got 'T2w'"):
        load_methods(lambda conditioning: None, MODEL, None, "T2w")
