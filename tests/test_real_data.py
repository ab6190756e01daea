"""Real scans: the evaluate config on the real co-registered case, (input, target) datalists, robust normalisation.

The real case (../shared/data/real/bids, one glioma patient) is never part of the repository: those tests skip
without it. It is evaluated on its own 1 mm grid and block-averaged to 2 and 4 mm, and its images thickened to 5 mm
axial slices for super-resolution; every quality assertion is against the same run's baselines.
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
from scripts.evaluation import (REAL_TASKS, Method, bids_cases, downsample_bids, evaluation_tasks, load_pairs,
                                run_evaluation, tasks_for, thicken_bids)
from scripts.intensity import WM_PEAK_LEVEL, normalize_intensity
from scripts.synthesis_engine import TUMSynInferer

REAL = os.path.normpath(os.path.join(BUNDLE_ROOT, "..", "..", "shared", "data", "real", "bids"))
needs_real = pytest.mark.skipif(not os.path.isdir(REAL), reason="the real case (../shared/data/real) is absent")
CONFIG = os.path.join(BUNDLE_ROOT, "configs", "evaluate.yaml")
# The four tasks a pre-contrast input can answer; T1w -> T1CE cannot (where this patient enhances is not in a
# pre-contrast scan) and is reported, not gated.
ANSWERABLE = ("T1w->T2w", "T1w->FLAIR", "T2w->FLAIR", "FLAIR->T1w")
# Margins against the same run's baselines (Pearson r inside the brain), the config's defaults, per grid (mm): the
# text model's r minus the input's own |r| must reach ABOVE_INPUT, and the lookup table's r (fitted on the answer)
# minus the model's must stay within FROM_LUT.
ABOVE_INPUT = @@ABOVE
FROM_LUT = @@FROMLUT
# Super-resolution of each real contrast from 5 mm axial slices (5 slices averaged) back to 1 mm: the text model
# against trilinear interpolation of the thick scan (the identity), PSNR (dB) and r.
THICK_SLICES = 5
SR_PSNR_MARGIN_DB = @@SRDB
SR_R_MARGIN = @@SRR


def _evaluate_real_case(root, downsample=1, **overrides):
    """The evaluate config on the real case (block-averaged by ``downsample``): its output folder and the metrics
    rows by (task, method)."""
    workflow = ConfigWorkflow(config_file=CONFIG, workflow_type=None, dataset_dir=REAL, output_dir=str(root / "out"),
                              eval_downsample=downsample, **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    with open(root / "out" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return root / "out", {(row["task"], row["method"]): row for row in rows}


def _r(rows, task, method):
    return float(rows[(task, method)]["pearson"])


@pytest.fixture(scope="module", params=[1, 2, 4], ids=["1mm", "2mm", "4mm"])
def real_evaluation(request, tmp_path_factory):
    return request.param, *_evaluate_real_case(tmp_path_factory.mktemp("real"), downsample=request.param)


@pytest.fixture(scope="module")
def real_thick_slices(tmp_path_factory):
    return _evaluate_real_case(tmp_path_factory.mktemp("thick"), thicken=THICK_SLICES)


@needs_real
def test_real_case_has_every_task_baseline_and_stated_normalisation(real_evaluation):
    _, out, rows = real_evaluation
    assert tasks_for(REAL) == REAL_TASKS
    assert {task for task, _ in rows} == {task.name for task in REAL_TASKS}
    assert {method for _, method in rows} == {"tumsyn", "identity", "oracle-lut"}
    text = (out / "metrics.md").read_text()
    assert "99th percentile inside the brain" in text and "both non-zero" in text
    assert os.path.getsize(out / "metrics.png") > 0
    for task in REAL_TASKS:  # the lookup table is fitted on the answer: no voxel-wise remapping of the input beats it
        assert _r(rows, task.name, "oracle-lut") >= abs(_r(rows, task.name, "identity")) - 1e-6


@needs_real
@pytest.mark.parametrize("task", ANSWERABLE)
def test_real_case_against_the_input_and_the_lookup_table(real_evaluation, task):
    grid, out, rows = real_evaluation
    model, given, lookup = (_r(rows, task, method) for method in ("tumsyn", "identity", "oracle-lut"))
    print(f"\n{grid} mm {task}: model {model:.3f}, input |r| {abs(given):.3f}, lookup table {lookup:.3f}")
    assert model - abs(given) >= ABOVE_INPUT[grid][task], (model, given)
    assert lookup - model <= FROM_LUT[grid][task], (model, lookup)


@needs_real
def test_t1ce_from_a_pre_contrast_input_is_reported(real_evaluation):
    """Not gated: the enhancement is not in the input. Its row is in metrics.md's baseline table all the same."""
    grid, out, rows = real_evaluation
    model, given = _r(rows, "T1w->T1CE", "tumsyn"), _r(rows, "T1w->T1CE", "identity")
    print(f"\n{grid} mm T1w->T1CE: model {model:.3f}, input {given:.3f}")
    assert "| T1w->T1CE | tumsyn |" in (out / "metrics.md").read_text()


@needs_real
@pytest.mark.parametrize("modality", ["T1w", "T1CE", "T2w", "FLAIR"])
def test_real_super_resolution_against_trilinear(real_thick_slices, modality):
    """Each real contrast, 5 axial slices averaged into one and restored to 1 mm in its own contrast."""
    _, rows = real_thick_slices
    task = f"ax{THICK_SLICES}mm {modality}->{modality}"
    model, trilinear = rows[(task, "tumsyn")], rows[(task, "identity")]
    print(f"\n{task}: PSNR {float(model['psnr']):.2f} vs {float(trilinear['psnr']):.2f} dB, "
          f"r {float(model['pearson']):.3f} vs {float(trilinear['pearson']):.3f}")
    assert float(model["psnr"]) >= float(trilinear["psnr"]) + SR_PSNR_MARGIN_DB[modality]
    assert float(model["pearson"]) >= float(trilinear["pearson"]) + SR_R_MARGIN[modality]


@needs_real
def test_datalist_of_plain_pairs(tmp_path):
    from scripts.evaluation import tasks_named

    small = downsample_bids(REAL, str(tmp_path / "small"), 4)
    anat = tmp_path / "small" / "sub-TCGADU7294" / "anat"
    shutil.copy(anat / "sub-TCGADU7294_T2w.nii.gz", tmp_path / "input.nii.gz")
    shutil.copy(anat / "sub-TCGADU7294_FLAIR.nii.gz", tmp_path / "target.nii.gz")
    datalist = tmp_path / "pairs.json"
    datalist.write_text(json.dumps([{"input": "input.nii.gz", "target": "target.nii.gz", "prompt": "FLAIR"}]))
    (case,) = load_pairs(str(datalist))
    assert case.prompt.modality == "FLAIR" and case.prompt.tr is None and case.prompt.voxel_size == (4.0, 4.0, 4.0)
    methods = [Method("identity", None, "identity"), Method("oracle-lut", None, "oracle_lut")]
    rows = run_evaluation(None, str(tmp_path / "out"), methods, TUMSynInferer(progress=False), datalist=str(datalist))
    assert [row["task"] for row in rows] == ["input->FLAIR"] * 2
    named = run_evaluation(small, str(tmp_path / "bids_out"), methods, TUMSynInferer(progress=False),
                           tasks_named(["T2w->FLAIR"], REAL_TASKS))
    assert [row["pearson"] for row in rows] == pytest.approx([row["pearson"] for row in named], abs=1e-6)
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
    from scripts.evaluation import tasks_named

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
    from scripts.sim_vs_real import contrast_statistics, gmm_tissue_classes

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
    from scripts.intensity import map_landmarks

    source, target = np.array([0.1, 0.5, 1.0]), np.array([0.2, 0.4, 1.0])
    mapped = map_landmarks(np.array([0.0, 0.1, 0.3, 0.5, 1.0, 1.5]), source, target)
    # end segments continue with their own slopes: 0.5 below the first landmark, 1.2 above the last
    np.testing.assert_allclose(mapped, [0.15, 0.2, 0.3, 0.4, 1.0, 1.6], atol=1e-5)
    ties = map_landmarks(np.array([0.5, 0.5]), np.array([0.5, 0.5, 1.0]), target)  # 8-bit: tied landmarks
    assert np.all(np.isfinite(ties))


def test_landmark_normalisation_matches_the_training_landmarks(brain_image):
    from scripts.intensity import LANDMARK_PERCENTILES, TRAINING_LANDMARKS

    image, inside = brain_image
    for modality in ("T1w", "T2w", "FLAIR"):
        out = normalize_intensity(image * 700.0, method="landmarks", modality=modality)
        assert np.all(out[~inside] == 0)
        np.testing.assert_allclose(np.percentile(out[inside], LANDMARK_PERCENTILES), TRAINING_LANDMARKS[modality],
                                   atol=0.02)
    with pytest.raises(ValueError, match="needs the image's modality"):
        normalize_intensity(image, method="landmarks")


def test_training_landmarks_are_derived_from_a_dataset(tmp_path, brain_image):
    from scripts.intensity import LANDMARK_PERCENTILES
    from scripts.intensity_landmarks import training_landmarks

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
    from scripts.sim_vs_real import STATISTICS, claimed_rows, coverage_table, uncovered

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
