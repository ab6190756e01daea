"""Real scans: the evaluate config on the real co-registered case, (input, target) datalists, robust normalisation.

The real case (../shared/data/real/bids, one glioma patient) is never part of the repository: those tests skip
without it. It is block-averaged 4x (4 mm voxels) to keep the test short; docs/real_data.md has the 2 mm
table and explains why numbers at different voxel sizes differ.
"""

import csv
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE_ROOT
from scripts.data.intensity import WM_PEAK_LEVEL, normalize_intensity
from scripts.engine.evaluation import (
    REAL_TASKS,
    Method,
    bids_cases,
    downsample_bids,
    evaluation_tasks,
    load_pairs,
    run_evaluation,
    tasks_for,
    thicken_bids,
)
from scripts.engine.synthesis_engine import TUMSynInferer

REAL = os.path.normpath(os.path.join(BUNDLE_ROOT, "..", "..", "shared", "data", "real", "bids"))
needs_real = pytest.mark.skipif(not os.path.isdir(REAL), reason="the real case (../shared/data/real) is absent")
CONFIG = os.path.join(BUNDLE_ROOT, "configs", "evaluate.yaml")
DOWNSAMPLE = 4
# Measured with the shipped weights at 4 mm (Pearson r inside the brain), the evaluate config's defaults
# (intensity_scales auto, guided_filter_radius 1): tumsyn, identity, oracle-lut.
MEASURED_R = {
    "T1w->T2w": (0.489, 0.096, 0.490),
    "T1w->FLAIR": (0.889, 0.835, 0.907),
    "T1w->T1CE": (0.934, 0.966, 0.968),
    "T2w->FLAIR": (0.740, 0.255, 0.788),
    "FLAIR->T1w": (0.849, 0.835, 0.886),
}
# Without the guided filter (guided_filter_radius 0, the default before version 0.4.0): tumsyn.
UNGUIDED_R = {"T1w->T2w": 0.488, "T1w->FLAIR": 0.886, "T1w->T1CE": 0.930, "T2w->FLAIR": 0.755, "FLAIR->T1w": 0.836}
# With the input at its normalised scale (intensity_scales [1.0], the default before version 0.3.0): tumsyn, one-hot.
UNSCALED_R = {
    "T1w->T2w": (0.448, 0.353),
    "T1w->FLAIR": (0.877, 0.873),
    "T1w->T1CE": (0.834, 0.854),
    "T2w->FLAIR": (0.689, 0.705),
    "FLAIR->T1w": (0.767, 0.834),
}
R_MARGIN = 0.05


def _evaluate_real_case(root, downsample=DOWNSAMPLE, **overrides):
    """The evaluate config on the real case (4 mm unless told): its output folder and r per (task, method)."""
    workflow = ConfigWorkflow(config_file=CONFIG, workflow_type=None, dataset_dir=REAL, output_dir=str(root / "out"),
                              eval_downsample=downsample, **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    with open(root / "out" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return root / "out", {(row["task"], row["method"]): float(row["pearson"]) for row in rows}


@pytest.fixture(scope="module")
def real_evaluation(tmp_path_factory):
    return _evaluate_real_case(tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def real_evaluation_unscaled(tmp_path_factory):
    return _evaluate_real_case(tmp_path_factory.mktemp("real_unscaled"), intensity_scales=[1.0])


@pytest.fixture(scope="module")
def real_evaluation_unguided(tmp_path_factory):
    return _evaluate_real_case(tmp_path_factory.mktemp("real_unguided"), guided_filter_radius=0)


@pytest.fixture(scope="module")
def real_evaluation_flip_averaged(tmp_path_factory):
    return _evaluate_real_case(tmp_path_factory.mktemp("real_flip"), flip_averaging=True)


@needs_real
def test_real_case_has_every_task_baseline_and_stated_normalisation(real_evaluation):
    out, r = real_evaluation
    assert tasks_for(REAL) == REAL_TASKS
    assert {task for task, _ in r} == {task.name for task in REAL_TASKS}
    assert {method for _, method in r} >= {"tumsyn", "identity", "oracle-lut"}
    text = (out / "metrics.md").read_text()
    assert "99th percentile inside the brain" in text and "both non-zero" in text
    # the bar's "every task beats the input", as metrics.md reports it: met on all but T1w -> T1CE (docs/real_data.md)
    for task in MEASURED_R:
        assert f"| {task} | tumsyn | {'0' if task == 'T1w->T1CE' else '1'} of 1 |" in text, task
    assert os.path.getsize(out / "metrics.png") > 0


@needs_real
@pytest.mark.parametrize("task", list(MEASURED_R))
def test_real_case_matches_measured_correlations(real_evaluation, task):
    _, r = real_evaluation
    for method, measured in zip(("tumsyn", "identity", "oracle-lut"), MEASURED_R[task]):
        assert r[(task, method)] == pytest.approx(measured, abs=R_MARGIN), (task, method)
    # The lookup table is fitted on the answer: no voxel-wise remapping of the input beats it.
    assert r[(task, "oracle-lut")] >= abs(r[(task, "identity")]) - 1e-6


@needs_real
def test_auto_intensity_scales_raise_the_multi_task_networks_on_every_real_task(
        real_evaluation, real_evaluation_unscaled):
    """The default ``intensity_scales: auto`` against the input at its normalised scale: every task of the text model
    and of the one-hot ablation rises (docs/real_data.md; the factors were chosen on this case for the text model)."""
    out, auto = real_evaluation
    assert "intensity scales picked per task (intensity_scales auto: 0.6, 0.8 where" in (out / "metrics.md").read_text()
    _, unscaled = real_evaluation_unscaled
    for task, measured in UNSCALED_R.items():
        for method, value in zip(("tumsyn", "onehot"), measured):
            assert unscaled[(task, method)] == pytest.approx(value, abs=R_MARGIN), (task, method)
            assert auto[(task, method)] > unscaled[(task, method)], (task, method)


@needs_real
def test_guided_filter_raises_the_text_model_on_four_of_five_real_tasks(real_evaluation, real_evaluation_unguided):
    """The default guided filter against the network's prediction as it is (docs/real_data.md): r rises on every task
    but T2w -> FLAIR, whose map is not monotonic (CSF inverted, lesions bright in both), so no window's affine
    function of the input fits it, and which falls by 0.015."""
    out, guided = real_evaluation
    assert "then guided by the input (guided_filter_radius 1" in (out / "metrics.md").read_text()
    _, unguided = real_evaluation_unguided
    for task, measured in UNGUIDED_R.items():
        assert unguided[(task, "tumsyn")] == pytest.approx(measured, abs=R_MARGIN), task
        if task == "T2w->FLAIR":
            assert unguided[(task, "tumsyn")] - 0.03 < guided[(task, "tumsyn")] < unguided[(task, "tumsyn")], task
        else:
            assert guided[(task, "tumsyn")] > unguided[(task, "tumsyn")], task
    for key in set(guided) - {key for key in guided if key[1] in ("tumsyn", "onehot", "task-specific")}:
        assert guided[key] == pytest.approx(unguided[key], abs=1e-6), key  # the baselines run no network


# At 2 mm, the text model alone (the 0.4.0 defaults), without and with the coarse pass (version 0.5.0, opt-in).
TWO_MM_R = {
    "T1w->T2w": (0.261, 0.352),
    "T1w->FLAIR": (0.738, 0.756),
    "T1w->T1CE": (0.876, 0.878),
    "T2w->FLAIR": (0.607, 0.633),
    "FLAIR->T1w": (0.774, 0.793),
}


@needs_real
def test_coarse_pass_raises_every_real_task_at_2_mm(tmp_path):
    """A second pass on the input block-averaged to 4 mm, the low frequencies taken from it (docs/real_data.md): at
    2 mm every task of the shared case rises, T1w -> T2w from below its 2 mm bar (the input's |r| 0.237 + 0.05) to
    above it and above the lookup table's 0.316; at 4 mm it does not run (8 mm blocks)."""
    methods = dict(onehot_ckpt_path=None, task_models=None)
    out, coarse = _evaluate_real_case(tmp_path / "coarse", downsample=2, coarse_pass=True, **methods)
    assert "with the low frequencies of the same prediction on the input block-averaged 2x" in (
        out / "metrics.md").read_text()
    _, single = _evaluate_real_case(tmp_path / "single", downsample=2, **methods)
    for task, (measured_single, measured_coarse) in TWO_MM_R.items():
        assert single[(task, "tumsyn")] == pytest.approx(measured_single, abs=0.01), task
        assert coarse[(task, "tumsyn")] == pytest.approx(measured_coarse, abs=0.01), task
        assert coarse[(task, "tumsyn")] > single[(task, "tumsyn")], task
    bar = abs(single[("T1w->T2w", "identity")]) + R_MARGIN
    assert coarse[("T1w->T2w", "tumsyn")] > max(bar, single[("T1w->T2w", "oracle-lut")])


@needs_real
def test_where_the_shipped_model_beats_the_input_on_real_data(real_evaluation, real_evaluation_unscaled):
    """Written down honestly (docs/real_data.md): with the defaults the text model beats the input's |r| on four
    tasks, FLAIR->T1w by 0.014 (0.849 vs 0.835), and not T1w->T1CE (0.934 vs 0.966: T1CE differs from T1w
    only by enhancement; the lookup table fitted on the answer reaches 0.968). At the input's own scale it beat the
    input only where the contrast must be inverted or remapped (T1w->T2w, T2w->FLAIR)."""
    _, r = real_evaluation
    for task in ("T1w->T2w", "T1w->FLAIR", "T2w->FLAIR", "FLAIR->T1w"):
        assert r[(task, "tumsyn")] > abs(r[(task, "identity")]), task
    assert r[("T1w->T1CE", "tumsyn")] < r[("T1w->T1CE", "identity")]
    _, unscaled = real_evaluation_unscaled
    for task in ("T1w->T2w", "T2w->FLAIR"):
        assert unscaled[(task, "tumsyn")] > abs(unscaled[(task, "identity")]) + 0.05, task
    for task in ("T1w->T1CE", "FLAIR->T1w"):
        assert unscaled[(task, "tumsyn")] < unscaled[(task, "identity")], task


# The shipped task-specific baselines (models/model_task_*.pt) on their own pairs, measured at 4 mm with the input at
# its normalised scale, and with the default auto scales (both guided by the input).
TASK_SPECIFIC_MEASURED_R = {"T1w->T2w": (0.519, 0.463), "T2w->FLAIR": (0.796, 0.783)}


@needs_real
@pytest.mark.parametrize("task", list(TASK_SPECIFIC_MEASURED_R))
def test_task_specific_baselines_beat_the_lookup_table_on_real_data(real_evaluation_unscaled, real_evaluation, task):
    """Each one-pair model synthesizes beyond any grey-level remapping on the real patient at its input's own scale:
    above the oracle lookup table and more than 0.05 above the input's |r|. The auto factors were chosen for the
    multi-task text model: they leave the T2w -> FLAIR model where it was and lower the T1w -> T2w one below the
    lookup table (0.463 vs 0.490)."""
    _, r = real_evaluation_unscaled
    unscaled, auto = TASK_SPECIFIC_MEASURED_R[task]
    assert r[(task, "task-specific")] == pytest.approx(unscaled, abs=R_MARGIN)
    assert r[(task, "task-specific")] > r[(task, "oracle-lut")]
    assert r[(task, "task-specific")] > abs(r[(task, "identity")]) + 0.05
    assert real_evaluation[1][(task, "task-specific")] == pytest.approx(auto, abs=R_MARGIN)


# The default evaluation with flip_averaging (each network's prediction averaged over the input's 8 mirror images at
# each auto factor, then guided by the input), measured at 4 mm: tumsyn, one-hot.
FLIP_AVERAGED_R = {
    "T1w->T2w": (0.532, 0.400),
    "T1w->FLAIR": (0.888, 0.896),
    "T1w->T1CE": (0.936, 0.933),
    "T2w->FLAIR": (0.744, 0.737),
    "FLAIR->T1w": (0.851, 0.872),
}


@needs_real
def test_flip_averaging_raises_the_networks_on_the_real_tasks(real_evaluation, real_evaluation_flip_averaged):
    _, single = real_evaluation
    out, averaged = real_evaluation_flip_averaged
    assert "averaged over 8 mirror images" in (out / "metrics.md").read_text()
    networks = [key for key in single if key[1] in ("tumsyn", "onehot", "task-specific")]
    assert len(networks) == 2 * len(MEASURED_R) + len(TASK_SPECIFIC_MEASURED_R)
    # every network on every task rises but the text model's T1w->FLAIR, level (0.888 vs 0.889: the guided filter
    # had already given it the input's edges that averaging sharpens)
    rises = [key for key in networks if averaged[key] > single[key]]
    assert len(rises) >= len(networks) - 1, sorted(set(networks) - set(rises))
    for key in networks:
        assert averaged[key] > single[key] - 0.005, key
    for key in set(single) - set(networks):  # the baselines do not run a network
        assert averaged[key] == pytest.approx(single[key], abs=1e-6), key
    for task, measured in FLIP_AVERAGED_R.items():
        for method, value in zip(("tumsyn", "onehot"), measured):
            assert averaged[(task, method)] == pytest.approx(value, abs=R_MARGIN), (task, method)


@needs_real
@pytest.mark.parametrize("fixture", ["real_evaluation", "real_evaluation_flip_averaged"])
def test_issue_bar_on_real_data(fixture, request):
    """The issue's bar, as far as it is met (docs/real_data.md), by the shipped text model with the default
    intensity scales, with and without flip averaging: T1w->T2w and T1w->FLAIR at least 0.05 above the input's |r|
    and within 0.05 of the oracle lookup table (the margins are thin: 0.049 / 0.004 single, 0.092 / 0.003
    flip-averaged); every task but T1w->T1CE above the input."""
    _, r = request.getfixturevalue(fixture)
    for task in ("T1w->T2w", "T1w->FLAIR"):
        model, given, lookup = (r[(task, method)] for method in ("tumsyn", "identity", "oracle-lut"))
        assert model >= abs(given) + 0.05 and model >= lookup - 0.05, task
    for task in ("T2w->FLAIR", "FLAIR->T1w"):
        assert r[(task, "tumsyn")] > abs(r[(task, "identity")]), task


@needs_real
def test_datalist_of_plain_pairs(tmp_path, real_evaluation):
    out, _ = real_evaluation
    anat = out / "downsampled_data" / "sub-TCGADU7294" / "anat"
    shutil.copy(anat / "sub-TCGADU7294_T2w.nii.gz", tmp_path / "input.nii.gz")
    shutil.copy(anat / "sub-TCGADU7294_FLAIR.nii.gz", tmp_path / "target.nii.gz")
    datalist = tmp_path / "pairs.json"
    datalist.write_text(json.dumps([{"input": "input.nii.gz", "target": "target.nii.gz", "prompt": "FLAIR"}]))
    (case,) = load_pairs(str(datalist))
    assert case.prompt.modality == "FLAIR" and case.prompt.tr is None and case.prompt.voxel_size == (4.0, 4.0, 4.0)
    methods = [Method("identity", None, "identity"), Method("oracle-lut", None, "oracle_lut")]
    rows = run_evaluation(None, str(tmp_path / "out"), methods, TUMSynInferer(progress=False), datalist=str(datalist))
    assert [row["task"] for row in rows] == ["input->FLAIR"] * 2
    assert rows[1]["pearson"] == pytest.approx(MEASURED_R["T2w->FLAIR"][2], abs=R_MARGIN)
    datalist.write_text(json.dumps([{"input": "input.nii.gz", "target": "target.nii.gz"}]))
    with pytest.raises(ValueError, match="entry 0: .*not a BIDS-named image"):
        load_pairs(str(datalist))


def test_downsample_keeps_world_positions(tmp_path):
    root = tmp_path / "bids"
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "participants.tsv").write_text("participant_id\nsub-01\n")
    image = np.arange(6 * 6 * 5, dtype=np.float32).reshape(6, 6, 5)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    downsample_bids(str(root), str(tmp_path / "small"), 2)
    small = nib.load(tmp_path / "small" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    assert small.shape == (3, 3, 2)
    assert small.get_fdata()[0, 0, 0] == pytest.approx(image[:2, :2, :2].mean())
    np.testing.assert_allclose(small.affine[:3, 3], [0.5, 0.5, 0.5])  # the centre of the first 2x2x2 block
    assert (tmp_path / "small" / "participants.tsv").is_file()
    with pytest.raises(ValueError, match="eval_downsample"):
        downsample_bids(str(root), str(tmp_path / "bad"), 0)


def test_thicken_writes_thick_axial_copies_beside_the_originals(tmp_path):
    root = tmp_path / "bids"
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "participants.tsv").write_text("participant_id\nsub-01\n")
    image = np.random.default_rng(0).random((6, 7, 10)).astype(np.float32)
    affine = np.array([[-1.0, 0, 0, 90], [0, 0, 1.0, -20], [0, -1.0, 0, 30], [0, 0, 0, 1]])  # axial = file axis 1
    for name in ("sub-01_T1w.nii.gz", "sub-01_ce-gadolinium_T1w.nii.gz"):
        nib.save(nib.Nifti1Image(image, affine), root / "sub-01" / "anat" / name)
    (root / "sub-01" / "anat" / "sub-01_T1w.json").write_text("{}")
    out = thicken_bids(str(root), str(tmp_path / "thick"), 3)
    anat = tmp_path / "thick" / "sub-01" / "anat"
    thick = nib.load(anat / "sub-01_acq-ax3mm_T1w.nii.gz")
    assert thick.shape == (6, 2, 10) and (anat / "sub-01_acq-ax3mm_ce-gadolinium_T1w.nii.gz").is_file()
    np.testing.assert_allclose(thick.get_fdata()[:, 0], image[:, :3].mean(axis=1), rtol=1e-6)
    # the thick slice's centre is the centre of the three slices it averages, in world space
    np.testing.assert_allclose(thick.affine @ [0, 0, 0, 1], affine @ [0, 1, 0, 1])
    assert (anat / "sub-01_T1w.nii.gz").is_file() and (anat / "sub-01_T1w.json").is_file()  # originals kept
    tasks = evaluation_tasks(out, None, 3)
    assert [t.name for t in tasks] == ["ax3mm T1w->T1w", "ax3mm T1CE->T1CE", "ax3mm T2w->T2w", "ax3mm FLAIR->FLAIR"]
    assert [c.task.name for c in bids_cases(out, tasks)] == ["ax3mm T1w->T1w", "ax3mm T1CE->T1CE"]
    assert evaluation_tasks(out, None, 0) == REAL_TASKS
    with pytest.raises(ValueError, match="thicken: expected 0 or a whole number of slices >= 2, got '1'"):
        evaluation_tasks(out, None, "1")


def test_a_task_runs_on_every_subject_of_a_dataset_without_its_sites(tmp_path):
    from scripts.engine.evaluation import tasks_named

    root = tmp_path / "bids"
    root.mkdir()
    (root / "participants.tsv").write_text("participant_id\tsite\nsub-01\tmine\nsub-02\tHCP-D\n")
    for subject in ("sub-01", "sub-02"):
        (root / subject / "anat").mkdir(parents=True)
        for suffix in ("T1w", "T2w"):
            nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)),
                     root / subject / "anat" / f"{subject}_{suffix}.nii.gz")
    task = tasks_named(["T1w->T2w"])  # the HCP-D site's task
    assert [c.subject for c in bids_cases(str(root), task)] == ["sub-02"]  # the dataset has that site
    (root / "participants.tsv").write_text("participant_id\tsite\nsub-01\tmine\nsub-02\tmine\n")
    assert [c.subject for c in bids_cases(str(root), task)] == ["sub-01", "sub-02"]  # it has not: every subject


@pytest.fixture
def brain_image():
    rng = np.random.default_rng(1)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 32)] * 3, indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    inside = radius < 0.85
    tissue = np.where(radius < 0.65, 0.9, np.where(radius < 0.78, 0.6, 0.3))  # WM core, GM shell, CSF rim (T1w-like)
    return (tissue + rng.normal(0, 0.03, tissue.shape)) * inside, inside


def test_normalisation_is_the_same_for_any_scale_and_dtype(brain_image):
    image, inside = brain_image
    reference = normalize_intensity(image)
    scaled = {
        "int16 with negatives": np.round(image * 3000 - 20 * inside * (image < 0.35)).astype(np.int16),
        "uint8": np.round(image / image.max() * 255).astype(np.uint8),
        "z-scored brain": np.where(inside, (image - image[inside].mean()) / image[inside].std(), 0).astype(np.float32),
        "offset background": (image * 100 + 50).astype(np.float32),
    }
    for name, variant in scaled.items():
        normalised = normalize_intensity(variant)
        r = np.corrcoef(normalised[inside], reference[inside])[0, 1]
        assert r > 0.97, name
        assert np.percentile(normalised[normalised > 0], 99) == pytest.approx(1.0, abs=0.05), name
        assert np.all(normalised[~inside] == 0), name


def test_default_normalisation_unchanged_for_training_like_images(brain_image):
    image, inside = brain_image
    expected = np.clip(image / np.percentile(image[image != 0], 99), 0, 1.5)
    np.testing.assert_allclose(normalize_intensity(image), expected, rtol=1e-6)


def test_white_matter_peak_landmark(brain_image):
    image, inside = brain_image
    bright_tail = image.copy()
    bright_tail[inside & (np.random.default_rng(2).random(image.shape) < 0.03)] = 3.0  # vessels/fat above WM
    normalised = normalize_intensity(bright_tail, method="wm_peak")
    core = inside & (np.sqrt(sum(g**2 for g in np.meshgrid(*[np.linspace(-1, 1, 32)] * 3, indexing="ij"))) < 0.5)
    assert np.median(normalised[core & (bright_tail < 2)]) == pytest.approx(WM_PEAK_LEVEL, abs=0.05)
    with pytest.raises(ValueError, match="method"):
        normalize_intensity(image, method="mean")


def test_sim_vs_real_statistics_on_a_phantom(brain_image):
    from sim_vs_real import contrast_statistics, gmm_tissue_classes

    image, inside = brain_image
    labels = gmm_tissue_classes(image, inside)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 32)] * 3, indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    assert np.mean(labels[radius < 0.6] == 2) > 0.99 and np.mean(labels[inside & (radius > 0.8)] == 0) > 0.99
    stats = contrast_statistics(image, labels, inside, np.zeros_like(inside))
    assert stats["WM/GM"] == pytest.approx(0.9 / 0.6, rel=0.03) and stats["CSF/GM"] == pytest.approx(0.5, rel=0.05)
    assert stats["noise"] == pytest.approx(0.03 / 0.9, rel=0.15) and np.isnan(stats["lesion/WM"])
    assert stats["z/xy grad"] == pytest.approx(1.0, abs=0.1)  # isotropic phantom: no through-plane blur


def test_landmark_map_hits_its_landmarks_and_continues_linearly():
    from scripts.data.intensity import map_landmarks

    source, target = np.array([0.1, 0.5, 1.0]), np.array([0.2, 0.4, 1.0])
    mapped = map_landmarks(np.array([0.0, 0.1, 0.3, 0.5, 1.0, 1.5]), source, target)
    # end segments continue with their own slopes: 0.5 below the first landmark, 1.2 above the last
    np.testing.assert_allclose(mapped, [0.15, 0.2, 0.3, 0.4, 1.0, 1.6], atol=1e-5)
    ties = map_landmarks(np.array([0.5, 0.5]), np.array([0.5, 0.5, 1.0]), target)  # 8-bit: tied landmarks
    assert np.all(np.isfinite(ties))


def test_landmark_normalisation_matches_the_training_landmarks(brain_image):
    from scripts.data.intensity import LANDMARK_PERCENTILES, TRAINING_LANDMARKS

    image, inside = brain_image
    for modality in ("T1w", "T2w", "FLAIR"):
        out = normalize_intensity(image * 700.0, method="landmarks", modality=modality)
        assert np.all(out[~inside] == 0)
        np.testing.assert_allclose(np.percentile(out[inside], LANDMARK_PERCENTILES), TRAINING_LANDMARKS[modality],
                                   atol=0.02)
    with pytest.raises(ValueError, match="needs the image's modality"):
        normalize_intensity(image, method="landmarks")


def test_training_landmarks_are_derived_from_a_dataset(tmp_path, brain_image):
    from intensity_landmarks import training_landmarks
    from scripts.data.intensity import LANDMARK_PERCENTILES

    image, inside = brain_image
    for subject, gain in (("sub-01", 1.0), ("sub-02", 2.0)):
        (tmp_path / subject / "anat").mkdir(parents=True)
        for name, volume in ((f"{subject}_T2w.nii.gz", image ** gain), (f"{subject}_acq-ax5mm_T2w.nii.gz", image)):
            image_file = nib.Nifti1Image(np.asarray(volume * 1000, np.float32), np.eye(4))
            nib.save(image_file, tmp_path / subject / "anat" / name)
    table = training_landmarks(str(tmp_path))
    assert list(table) == ["T2w"] and len(table["T2w"]) == len(LANDMARK_PERCENTILES)
    expected = np.mean([np.percentile(normalize_intensity(image**g)[inside], LANDMARK_PERCENTILES) for g in (1, 2)], 0)
    np.testing.assert_allclose(table["T2w"], expected, atol=1e-3)  # the acq- image is left out
    with pytest.raises(ValueError, match="no BIDS images"):
        training_landmarks(str(tmp_path / "empty"))


def test_coverage_table_marks_and_reads_back_the_covered_rows():
    from sim_vs_real import STATISTICS, claimed_rows, coverage_table, uncovered

    def row(value, **changes):
        return {"contrast": "T1w", **{s: value for s in STATISTICS}, **changes}

    real = [row(0.5, rim=0.9)]
    simulated = [row(0.4), row(0.6, rim=0.7)]  # rim: real 0.9 above every simulated value
    assert uncovered(real, simulated) == [("T1w", "rim", 0.9)]
    table = coverage_table(real, ("simulated", simulated))
    assert "| T1w | rim | 0.900 | 0.400-0.700 | **no** | 100% |" in table
    claimed = claimed_rows("## Heading\n\n" + table + "\n\n## Next\n", "## Heading")
    assert claimed == {("T1w", s) for s in STATISTICS if s != "rim"}
    assert claimed_rows(table, "## Missing heading") == set()
