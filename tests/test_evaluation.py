"""The evaluate config with the shipped weights on two held-out simulated subjects, against same-run baselines."""

import csv
import os

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE_ROOT, MODEL, SHIPPED_SCALE
from scripts.engine.evaluation import (
    TASK_SPECIFIC,
    TASKS,
    baseline_table,
    bids_image,
    load_methods,
    markdown_table,
    resample_to,
    summarise,
    tasks_named,
    truth_tissue_volumes,
)
from scripts.engine.volume_io import save_nifti
from scripts.nets.tumsyn_net import build_tumsyn_net

CONFIG = os.path.join(BUNDLE_ROOT, "configs", "evaluate.yaml")
# Every task of scripts.engine.evaluation.TASKS on 2 mm held-out subjects of every evaluation site, with the config's
# defaults. Each quality assertion is against a baseline of the same run, with a fixed margin.
EVALUATED_TASKS = [task.name for task in TASKS]
SR_MARGIN_DB = 1.0  # super-resolution within a contrast must beat trilinear interpolation of the input by this much
CROSS_CONTRAST = [t.name for t in tasks_named(EVALUATED_TASKS) if t.source != t.target]
SUPER_RESOLUTION = [t.name for t in tasks_named(EVALUATED_TASKS) if t.source == t.target]
ZERO_SHOT = [t.name for t in tasks_named(EVALUATED_TASKS) if t.group == "zero-shot"]
T1W_TARGETS = [t.name for t in tasks_named(EVALUATED_TASKS) if t.target == "T1w"]
# What the shipped model fails today (measured on these subjects, PSNR dB: text model vs baseline): strict, so a model
# that passes a row fails the suite until its mark is removed.
FAILS_LOOKUP_TABLE = {"PD->FLAIR", "T1w->PD", "T1w->SWI",  # 15.08 vs 16.30; 17.33 vs 21.31; 19.43 vs 19.87
                      "cor3.2mm PD->T1w", "ax5mm FLAIR->T1w (ADNI, unseen site)",  # 13.11 vs 20.03; 16.60 vs 18.92
                      "T1w->T2w (unseen TE)", "T1w->FLAIR (unseen TR/TE/TI)"}  # 10.25 vs 13.56; 12.81 vs 14.87
FAILS_TRILINEAR = {"sag4mm T1w->T1w", "ax5mm FLAIR->FLAIR"}  # 22.05 vs 25.02 + 1; 19.09 vs 22.14 + 1
FAILS_INPUT_VOLUMES = {"cor3.2mm PD->T1w"}  # 62.8 % vs 13.8 % off the truth


def _rows(tasks, failing, reason):
    return [pytest.param(task, marks=pytest.mark.xfail(strict=True, reason=reason)) if task in failing else task
            for task in tasks]


def _mean(rows, task, method, key="psnr"):
    values = [float(row[key]) for row in rows if row["task"] == task and row["method"] == method and row[key] != ""]
    assert values, (task, method, key)
    return float(np.mean(values))


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    if not os.path.isfile(MODEL):
        pytest.fail(f"{MODEL} is missing: the shipped weights are part of the bundle")
    root = tmp_path_factory.mktemp("evaluation")
    workflow = ConfigWorkflow(config_file=CONFIG, workflow_type=None, dataset_dir=str(root / "data"),
                              output_dir=str(root / "out"), simulate_voxel_mm=2)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    with open(root / "out" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    for task in EVALUATED_TASKS:  # the numbers behind the marks below
        print(task, {method: round(_mean(rows, task, method), 2) for method in
                     ("tumsyn", "onehot", "identity", "oracle-lut")})
    return root, rows


def test_writes_every_output(evaluation):
    root, rows = evaluation
    for name in ("metrics.csv", "summary.csv", "metrics.md", "metrics.png"):
        assert os.path.getsize(root / "out" / name) > 0
    assert {row["task"] for row in rows} == set(EVALUATED_TASKS)
    assert {row["method"] for row in rows} == {"tumsyn", "onehot", "identity", "oracle-lut"}
    # the networks' rows are finite scores, the one-hot ablation's included
    assert all(np.isfinite(float(row["psnr"])) and -1 <= float(row["pearson"]) <= 1 for row in rows)


@pytest.mark.parametrize("task", _rows(CROSS_CONTRAST, FAILS_LOOKUP_TABLE, "the shipped model is below the "
                                       "oracle lookup table's PSNR on this task"))
def test_cross_contrast_at_or_above_the_lookup_table(evaluation, task):
    _, rows = evaluation
    assert _mean(rows, task, "tumsyn") >= _mean(rows, task, "oracle-lut"), task


@pytest.mark.parametrize("task", _rows(SUPER_RESOLUTION, FAILS_TRILINEAR, "the shipped model is below "
                                       "trilinear interpolation of the input on this task"))
def test_super_resolution_above_trilinear(evaluation, task):
    _, rows = evaluation
    assert _mean(rows, task, "tumsyn") >= _mean(rows, task, "identity") + SR_MARGIN_DB, task


def test_text_model_at_or_above_the_onehot_ablation_on_zero_shot_rows(evaluation):
    _, rows = evaluation
    text = np.mean([_mean(rows, task, "tumsyn") for task in ZERO_SHOT])
    onehot = np.mean([_mean(rows, task, "onehot") for task in ZERO_SHOT])
    assert text >= onehot, (text, onehot)


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


def test_the_table_marks_the_tasks_a_method_does_not_run():
    """A task-specific model runs on the cases of its own (source, target) pair only: its cells elsewhere are '-'."""
    rows = [{"task": task, "method": method, "group": "synthesis", "psnr": 20.0, "ssim": 0.5, "pearson": 0.5}
            for task, method in (("T2w->FLAIR", "tumsyn"), ("T2w->FLAIR", TASK_SPECIFIC), ("T1w->PD", "tumsyn"))]
    lines = markdown_table(summarise(rows)).splitlines()
    assert lines[2].startswith("| T2w->FLAIR | 20.00 ± 0.00 |") and " - | - | - " not in lines[2]
    assert lines[3].endswith("| - | - | - |"), lines


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


def test_downstream_tissue_volumes_are_reported(evaluation):
    """T1w targets get the paper's Table 2 check: k-means tissue volumes of every method's image against the real
    image and against the simulator's truth, beside the real image's own error (hard k-means classes against
    partial-volume truth)."""
    root, rows = evaluation
    for task in T1W_TARGETS:
        task_rows = [row for row in rows if row["task"] == task]
        assert {row["method"] for row in task_rows} >= {"tumsyn", "onehot", "identity"}
        assert all(float(row["truth_volume_error_pct"]) >= 0.0 for row in task_rows), task_rows
    # the segmentation of the true images themselves: off by 7-9 % on two of the subjects, 70 % on the IXI one
    assert np.mean([float(row["real_truth_volume_error_pct"]) for row in rows if row["task"] in T1W_TARGETS]) < 50
    assert all(row["truth_volume_error_pct"] == "" for row in rows if row["task"] == "T2w->FLAIR")
    assert "Downstream (paper Table 2)" in (root / "out" / "metrics.md").read_text()


@pytest.mark.parametrize("task", _rows(T1W_TARGETS, FAILS_INPUT_VOLUMES, "the shipped model's synthesized "
                                       "T1w gives tissue volumes further from the truth than its input's"))
def test_synthesized_t1w_tissue_volumes_no_further_from_the_truth_than_the_inputs(evaluation, task):
    _, rows = evaluation
    model = _mean(rows, task, "tumsyn", "truth_volume_error_pct")
    assert model <= _mean(rows, task, "identity", "truth_volume_error_pct"), task


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


@pytest.mark.parametrize("override, skip", [(None, True), ("false", False), ("true", True)])
def test_every_evaluated_network_follows_the_input_skip_override(override, skip):
    """Weights trained with another decoder (a paper-scale run with the skip, version 0.1.0 small weights without)
    are evaluated by passing --network_def#input_skip: the text, one-hot and task-specific networks all follow it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(CONFIG)
    parser["scale"] = "small"  # a scale whose skip is optional (the unet's grey-level curve needs it)
    if override is not None:
        parser["network_def#input_skip"] = override
    channels = 16 + int(skip)  # the small encoder's width, plus the input
    for conditioning in ("text", "onehot"):
        network = parser.get_parsed_content("build_network")(conditioning)
        assert network.decoder.unfold_projection.in_channels == channels, conditioning


def test_task_specific_models_load_for_their_pair_only(tmp_path, caplog):
    weights = str(tmp_path / "t2w_to_flair.pt")
    torch.save(build_tumsyn_net(SHIPPED_SCALE, conditioning="onehot").state_dict(), weights)
    models = {"T2w->FLAIR": weights, "T1w->T2w": str(tmp_path / "missing.pt")}
    methods = load_methods(lambda conditioning: build_tumsyn_net(SHIPPED_SCALE, conditioning=conditioning), MODEL, None,
                           models)
    assert [m.name for m in methods] == ["tumsyn", TASK_SPECIFIC, "identity", "oracle-lut"]
    assert "missing.pt not found" in caplog.text
    assert [t.name for t in TASKS if methods[1].applies_to(t)] == ["T2w->FLAIR"]
    assert all(methods[0].applies_to(t) for t in TASKS)
    with pytest.raises(ValueError, match="^task_models: expected 'source->target' .* got 'T2w->Flair'"):
        load_methods(lambda conditioning: None, MODEL, None, {"T2w->Flair": weights})
    # The command line passes null as a word: no task-specific models; anything else that is not a mapping is refused.
    methods = load_methods(lambda conditioning: build_tumsyn_net(SHIPPED_SCALE, conditioning=conditioning), MODEL, None,
                           "null")
    assert [m.name for m in methods] == ["tumsyn", "identity", "oracle-lut"]
    with pytest.raises(ValueError, match="^task_models: expected a mapping .* got 'T2w'"):
        load_methods(lambda conditioning: None, MODEL, None, "T2w")
