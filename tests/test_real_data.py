"""Real scans: the evaluate config on the real co-registered case, (input, target) datalists, robust normalisation.

The real case (../shared/data/real/bids, one glioma patient) is never part of the repository: those tests skip
without it. It is scored at its native 1 mm grid on the four tasks the model must do (the quality gate) and
block-averaged 4x (4 mm voxels) for everything else; the real case is only measured, never tuned on.
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
    thick_slice_tasks,
    thicken_bids,
)
from scripts.engine.synthesis_engine import TUMSynInferer

REAL = os.path.normpath(os.path.join(BUNDLE_ROOT, "..", "..", "shared", "data", "real", "bids"))
needs_real = pytest.mark.skipif(not os.path.isdir(REAL), reason="the real case (../shared/data/real) is absent")
CONFIG = os.path.join(BUNDLE_ROOT, "configs", "evaluate.yaml")
DOWNSAMPLE = 4
# The baselines at 4 mm (Pearson r inside the brain; no network runs in them): identity, oracle-lut.
BASELINE_R = {
    "T1w->T2w": (0.096, 0.490),
    "T1w->FLAIR": (0.835, 0.907),
    "T1w->T1CE": (0.966, 0.968),
    "T2w->FLAIR": (0.255, 0.788),
    "FLAIR->T1w": (0.835, 0.886),
}
R_MARGIN = 0.05
# The quality gate at the native 1 mm grid: r at least R_MARGIN above the input's own |r| and at most R_MARGIN below
# the oracle lookup table's r (fitted on the answer). T1w -> T1CE from a pre-contrast input is exempt.
GATED_TASKS = ["T1w->T2w", "T1w->FLAIR", "T2w->FLAIR", "FLAIR->T1w"]
# What the shipped model fails today at 1 mm (r: text model, input |r|, lookup table): T1w->T2w 0.161, 0.438, 0.560;
# T1w->FLAIR 0.681, 0.654, 0.737; T2w->FLAIR 0.579, 0.335, 0.597 (passes); FLAIR->T1w 0.695, 0.656, 0.720 (near the
# lookup table, not 0.05 above the input).
FAILS_ABOVE_INPUT = {"T1w->T2w", "T1w->FLAIR", "FLAIR->T1w"}
FAILS_NEAR_LOOKUP_TABLE = {"T1w->T2w", "T1w->FLAIR"}
# Super-resolution on real scans: each contrast at 1 mm, every THICKEN axial slices averaged into one (a 5 mm clinical
# 2D scan) and restored in its own contrast, must beat trilinear interpolation of the thick copy (the identity) in
# PSNR and in r. The shipped model fails all four (PSNR / r, model vs trilinear): T1w 17.13 / 0.953 vs 27.65 / 0.983;
# T1CE 16.03 / 0.898 vs 22.25 / 0.939; T2w 12.03 / 0.845 vs 26.48 / 0.961; FLAIR 22.82 / 0.929 vs 23.87 / 0.942.
THICKEN = 5
SR_TASKS = [task.name for task in thick_slice_tasks(THICKEN)]
FAILS_REAL_SR = set(SR_TASKS)


def _metric(out, name):
    """One column of an evaluate run's metrics.csv per (task, method)."""
    with open(out / "metrics.csv") as handle:
        return {(row["task"], row["method"]): float(row[name]) for row in csv.DictReader(handle)}


def _evaluate_real_case(root, downsample=DOWNSAMPLE, **overrides):
    """The evaluate config on the real case (4 mm unless told): its output folder and r per (task, method)."""
    workflow = ConfigWorkflow(config_file=CONFIG, workflow_type=None, dataset_dir=REAL, output_dir=str(root / "out"),
                              eval_downsample=downsample, **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return root / "out", _metric(root / "out", "pearson")


def _report(title, r, tasks):
    """Print the text model's r beside the input's |r| and the lookup table's (a report, not an assertion)."""
    print(title)
    for task in tasks:
        print(f"  {task}: tumsyn {r[(task, 'tumsyn')]:.3f}, input |r| {abs(r[(task, 'identity')]):.3f}, "
              f"oracle-lut {r[(task, 'oracle-lut')]:.3f}")


@pytest.fixture(scope="module")
def real_evaluation(tmp_path_factory):
    return _evaluate_real_case(tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def real_evaluation_native(tmp_path_factory):
    """The text model alone on the gated tasks at the case's own 1 mm grid."""
    out, r = _evaluate_real_case(tmp_path_factory.mktemp("real_native"), downsample=1, tasks=GATED_TASKS,
                                 onehot_ckpt_path=None, task_models=None)
    _report("real case at 1 mm", r, GATED_TASKS)
    return out, r


@pytest.fixture(scope="module")
def real_sr_evaluation(tmp_path_factory):
    """The text model restoring thick-slice copies of the case's 1 mm contrasts: PSNR and r per (task, method)."""
    out, r = _evaluate_real_case(tmp_path_factory.mktemp("real_sr"), downsample=1, thicken=THICKEN, tasks=SR_TASKS,
                                 onehot_ckpt_path=None, task_models=None)
    psnr = _metric(out, "psnr")
    print(f"real case, {THICKEN} mm axial slices restored to 1 mm (PSNR dB / r)")
    for task in SR_TASKS:
        print(f"  {task}: tumsyn {psnr[(task, 'tumsyn')]:.2f} / {r[(task, 'tumsyn')]:.3f}, "
              f"trilinear {psnr[(task, 'identity')]:.2f} / {r[(task, 'identity')]:.3f}")
    return psnr, r


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
    for task in BASELINE_R:
        assert f"| {task} | tumsyn | " in text, task
    assert os.path.getsize(out / "metrics.png") > 0
    _report("real case at 4 mm", r, list(BASELINE_R))


@needs_real
@pytest.mark.parametrize("task", list(BASELINE_R))
def test_real_case_baselines(real_evaluation, task):
    _, r = real_evaluation
    for method, measured in zip(("identity", "oracle-lut"), BASELINE_R[task]):
        assert r[(task, method)] == pytest.approx(measured, abs=0.01), (task, method)
    # The lookup table is fitted on the answer: no voxel-wise remapping of the input beats it.
    assert r[(task, "oracle-lut")] >= abs(r[(task, "identity")]) - 1e-6


def _known_failures(tasks, failing, reason):
    """``tasks`` as parameters, those in ``failing`` marked strict xfail: passing one fails the suite until its
    mark is removed."""
    return [pytest.param(task, marks=pytest.mark.xfail(strict=True, reason=reason)) if task in failing else task
            for task in tasks]


@needs_real
@pytest.mark.parametrize("task", _known_failures(
    GATED_TASKS, FAILS_ABOVE_INPUT, "the shipped model is not 0.05 above the input's |r| at 1 mm on this task"))
def test_real_case_at_1_mm_above_the_input(real_evaluation_native, task):
    _, r = real_evaluation_native
    assert r[(task, "tumsyn")] >= abs(r[(task, "identity")]) + R_MARGIN, task


@needs_real
@pytest.mark.parametrize("task", _known_failures(
    GATED_TASKS, FAILS_NEAR_LOOKUP_TABLE,
    "the shipped model is more than 0.05 below the lookup table's r at 1 mm on this task"))
def test_real_case_at_1_mm_near_the_lookup_table(real_evaluation_native, task):
    _, r = real_evaluation_native
    assert r[(task, "tumsyn")] >= r[(task, "oracle-lut")] - R_MARGIN, task


@needs_real
@pytest.mark.parametrize("task", _known_failures(
    SR_TASKS, FAILS_REAL_SR, "the shipped model restores thick real slices below trilinear interpolation"))
def test_real_thick_slices_restored_above_trilinear(real_sr_evaluation, task):
    psnr, r = real_sr_evaluation
    assert psnr[(task, "tumsyn")] > psnr[(task, "identity")], task
    assert r[(task, "tumsyn")] > r[(task, "identity")], task


@needs_real
def test_flip_averaging_changes_only_the_networks(real_evaluation, real_evaluation_flip_averaged):
    """The optional flip averaging: the networks' r with and without it are reported; the baselines run no
    network, so they stay."""
    _, single = real_evaluation
    out, averaged = real_evaluation_flip_averaged
    assert "averaged over 8 mirror images" in (out / "metrics.md").read_text()
    networks = [key for key in single if key[1] in ("tumsyn", "onehot")]
    assert networks
    for key in sorted(networks):
        print(f"{key}: single {single[key]:.3f}, flip-averaged {averaged[key]:.3f}")
    for key in set(single) - set(networks):
        assert averaged[key] == pytest.approx(single[key], abs=1e-6), key


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
    assert rows[1]["pearson"] == pytest.approx(BASELINE_R["T2w->FLAIR"][1], abs=0.01)
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
