"""MR-physics simulator: realism against the MNI template, literature contrast orderings, parameter effects,
acquisition geometry and noise, BIDS output and its prompt round trip, determinism, config entry point."""

import glob
import json
import os

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE_ROOT
from scripts.simulator import simulate
from scripts.simulator.acquisition import Geometry, acquire_geometry, add_rician_noise, noise_sigma
from scripts.simulator.anatomy import load_template, subject_anatomy
from scripts.simulator.generate import realism_subjects
from scripts.simulator.presets import MODALITIES, get_preset
from scripts.simulator.render import render
from scripts.simulator.sequences import Sequence, inversion_recovery, spin_echo
from scripts.simulator.tissue import tissue_properties, with_gadolinium

COARSE_MM = 2  # tests run on a 2 mm truth grid (8x fewer voxels) except the template-resolution realism check

SEQUENCES = {
    "T1w MPRAGE": Sequence("MPRAGE", 2300, 2.98, 900, 9),
    "T1w SE": Sequence("SE", 550, 12),
    "T1w GRE": Sequence("GRE", 20, 4, fa=25),
    "T2w": Sequence("SE", 5000, 100),
    "FLAIR": Sequence("IR", 9000, 110, 2400),
    "PD": Sequence("SE", 8000, 10),  # long-TR PD (IXI-like): CSF brightest
    "T2star": Sequence("GRE", 650, 20, fa=20),
    "SWI": Sequence("SWI", 30, 20, fa=15),
}


def _tissue_means(anatomy, image):
    """Mean intensity over voxels that are at least 90% one tissue (deep grey matter, never that pure in the
    template's probability maps: at least 50%)."""
    purity = {"WM": 0.9, "cGM": 0.9, "dGM": 0.5, "CSF": 0.9}
    return {t: float(image[anatomy.fraction(t) >= p].mean()) for t, p in purity.items()}


@pytest.fixture(scope="module")
def template():
    return load_template(COARSE_MM).anatomy


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two subjects simulated once: a BraTS tumour case and a clinical case (thick slices in three orientations)."""
    root = str(tmp_path_factory.mktemp("simulated"))
    images = simulate(root, num_subjects=2, seed=3, sites=["BraTS2021", "clinical"], voxel_mm=COARSE_MM,
                      progress=False)
    return root, images


def test_simulated_t1w_correlates_with_real_mni_template():
    """The template T1 is a real (averaged) MPRAGE on the same grid as its tissue maps: a simulation must match it."""
    template = load_template(1)
    brain = template.anatomy.brain() > 0.5
    image = render(template.anatomy, tissue_properties(3.0), SEQUENCES["T1w MPRAGE"], 3.0)
    r = np.corrcoef(image[brain], template.t1[brain])[0, 1]
    assert r >= 0.95, r


@pytest.mark.parametrize("field_strength", [1.5, 3.0])
def test_contrast_orderings_follow_the_literature(template, field_strength):
    props = tissue_properties(field_strength)
    means = {name: _tissue_means(template, render(template, props, seq, field_strength))
             for name, seq in SEQUENCES.items()}
    for name in ("T1w MPRAGE", "T1w SE", "T1w GRE"):  # WM > deep GM > cortex > CSF on T1w
        m = means[name]
        assert m["WM"] > m["dGM"] > m["cGM"] > 1.3 * m["CSF"], (name, m)
    assert means["T1w MPRAGE"]["cGM"] > 2 * means["T1w MPRAGE"]["CSF"]  # the inversion nearly nulls CSF
    for name in ("T2w", "PD", "T2star"):  # CSF brightest, GM above WM
        m = means[name]
        assert m["CSF"] > m["cGM"] > m["WM"], (name, m)
    flair = means["FLAIR"]
    assert flair["CSF"] < 0.2 * flair["WM"] < 0.2 * flair["cGM"], flair  # CSF nulled, GM above WM
    swi = means["SWI"]
    assert swi["dGM"] < swi["cGM"], swi  # iron-rich nuclei darker on SWI
    assert means["T2w"]["dGM"] < means["T2w"]["cGM"]


def test_swi_phase_mask_darkens_a_vein_parallel_to_b0():
    """A paramagnetic cylinder along B0 has a field shift of +chi/3 inside, so negative phase: dark on SWI."""
    from scripts.simulator.sequences import field_shift_ppm, swi_phase_mask
    chi = np.zeros((48, 48, 48), np.float32)
    x, y = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    chi[(x - 24) ** 2 + (y - 24) ** 2 <= 4] = 0.45
    np.testing.assert_allclose(field_shift_ppm(chi)[24, 24, 24], 0.45 / 3, rtol=0.1)
    mask = swi_phase_mask(chi, te_ms=20.0, field_strength=3.0, voxel_mm=1.0)
    assert mask[24, 24, 24] < 0.3 and mask[5, 5, 24] > 0.99
    assert swi_phase_mask(chi, 10.0, 3.0, 1.0)[24, 24, 24] > mask[24, 24, 24]  # phase grows with TE


def test_t1ce_brightens_enhancing_tissue_only():
    rng = np.random.default_rng(1)
    anatomy = subject_anatomy(rng, 50.0, "F", tumour=True, voxel_mm=COARSE_MM)
    props = tissue_properties(3.0)
    wm = anatomy.fraction("WM") >= 0.9
    pre = render(anatomy, props, SEQUENCES["T1w MPRAGE"], 3.0)
    post = render(anatomy, with_gadolinium(props, 3.0), SEQUENCES["T1w MPRAGE"], 3.0)
    enhancing = anatomy.fraction("enhancing") >= 0.5
    necrosis = anatomy.fraction("necrosis") >= 0.5
    assert enhancing.any()
    assert post[enhancing].mean() > 1.3 * pre[enhancing].mean()
    assert post[enhancing].mean() > post[wm].mean()
    intact = wm & (anatomy.fraction("vessel") == 0)  # intact blood-brain barrier, no blood vessel: no change
    np.testing.assert_allclose(post[intact], pre[intact], rtol=1e-5)
    if necrosis.any():
        assert post[necrosis].mean() < post[enhancing].mean()


def test_infant_white_matter_contrast_is_inverted(template):
    """Unmyelinated neonatal WM: darker than cortex on T1w, brighter on T2w; adult-like by two years."""
    for age, inverted in ((0.1, True), (3.0, False)):
        props = tissue_properties(3.0, age_years=age)
        t1w = _tissue_means(template, render(template, props, SEQUENCES["T1w MPRAGE"], 3.0))
        t2w = _tissue_means(template, render(template, props, SEQUENCES["T2w"], 3.0))
        assert (t1w["WM"] < t1w["cGM"]) == inverted, (age, t1w)
        assert (t2w["WM"] > t2w["cGM"]) == inverted, (age, t2w)


def test_parameter_changes_act_as_the_equations_say():
    props = tissue_properties(3.0)
    wm, csf = props["WM"], props["CSF"]

    def se_ratio(tr, te):
        return spin_echo(wm.pd, wm.t1, wm.t2, tr, te) / spin_echo(csf.pd, csf.t1, csf.t2, tr, te)

    # Longer TE: short-T2 tissue (WM) fades relative to CSF; longer TR: less T1 weighting, CSF catches up.
    te_ratios = [se_ratio(4000, te) for te in (10, 40, 80, 120)]
    tr_ratios = [se_ratio(tr, 15) for tr in (400, 800, 2000, 6000)]
    assert all(np.diff(te_ratios) < 0) and all(np.diff(tr_ratios) < 0)
    # FLAIR: CSF nulled at TI = T1 ln(2 / (1 + exp(-TR/T1))), bright again away from it.
    tr = 9000.0
    ti_null = csf.t1 * np.log(2.0 / (1.0 + np.exp(-tr / csf.t1)))
    csf_at = [inversion_recovery(csf.pd, csf.t1, csf.t2, tr, 100, ti) for ti in (ti_null, ti_null - 800, 500)]
    wm_flair = inversion_recovery(wm.pd, wm.t1, wm.t2, tr, 100, ti_null)
    assert csf_at[0] < 1e-3 * wm_flair and csf_at[0] < csf_at[1] < csf_at[2]
    # Spoiled GRE: a larger flip angle increases T1 weighting (WM/CSF ratio), a longer TE lowers the signal.
    from scripts.simulator.sequences import spoiled_gradient_echo as gre
    fa_ratios = [gre(wm.pd, wm.t1, wm.t2star, 20, 4, fa) / gre(csf.pd, csf.t1, csf.t2star, 20, 4, fa)
                 for fa in (5, 15, 30)]
    assert all(np.diff(fa_ratios) > 0)
    # MPRAGE: through the image, a TI towards the WM null darkens WM relative to GM.
    from scripts.simulator.sequences import mprage
    gm = props["cGM"]
    contrast = [mprage(wm.pd, wm.t1, wm.t2star, Sequence("MPRAGE", 2300, 3, ti, 9))
                / mprage(gm.pd, gm.t1, gm.t2star, Sequence("MPRAGE", 2300, 3, ti, 9)) for ti in (1100, 800)]
    assert contrast[0] > 1.0 and contrast[1] != contrast[0]


def test_mprage_matches_a_direct_time_stepping_simulation():
    """The affine fixed-point steady state equals running the sequence for many inversion periods."""
    from scripts.simulator.sequences import mprage
    seq = Sequence("MPRAGE", 2300, 3, 900, 9, echo_spacing=7.0, train_length=160)
    t1 = 1084.0
    mz, signal, alpha = 1.0, None, np.deg2rad(9)
    relax = lambda m, dt: 1 - (1 - m) * np.exp(-dt / t1)  # noqa: E731
    for _ in range(30):
        mz = relax(-mz, seq.readout_start)
        for k in range(seq.train_length):
            if k == seq.train_length // 2:
                signal = mz * np.sin(alpha)
            mz = mz * np.cos(alpha)
            mz = relax(mz, seq.echo_spacing if k < seq.train_length - 1 else seq.recovery)
    assert mprage(1.0, t1, 1e9, seq) == pytest.approx(abs(signal), rel=1e-6)


@pytest.mark.parametrize("orientation,expected_shape,expected_zooms", [
    ("axial", (20, 24, 8), (2.0, 2.0, 5.0)),
    ("coronal", (20, 22, 15), (2.0, 2.0, 3.2)),
    ("sagittal", (24, 22, 8), (2.0, 2.0, 5.0)),
])
def test_thick_slices_have_the_expected_grid_and_share_world_space(orientation, expected_shape, expected_zooms):
    """A linear intensity ramp in world space survives slab averaging and resampling exactly in the interior, so
    every acquired voxel sits at the world position its affine says."""
    shape, voxel = (40, 48, 44), 1.0
    truth_affine = np.array([[1.0, 0, 0, -20], [0, 1.0, 0, -30], [0, 0, 1.0, 5], [0, 0, 0, 1]])
    ijk = np.indices(shape).reshape(3, -1)
    world = (truth_affine[:3, :3] @ ijk + truth_affine[:3, 3:4]).reshape(3, *shape)
    ramp = (100.0 + 0.7 * world[0] - 0.4 * world[1] + 0.9 * world[2]).astype(np.float32)
    thickness = expected_zooms[2] if orientation != "axial" else 4.0
    geometry = Geometry(orientation, thickness, in_plane_mm=2.0, gap_mm=expected_zooms[2] - thickness)
    data, affine = acquire_geometry(ramp, truth_affine, voxel, geometry)
    assert data.shape == expected_shape
    np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), expected_zooms)
    assert geometry.voxel_size() == expected_zooms
    idx = np.indices(data.shape).reshape(3, -1)
    sampled_world = affine[:3, :3] @ idx + affine[:3, 3:4]
    expected = 100.0 + 0.7 * sampled_world[0] - 0.4 * sampled_world[1] + 0.9 * sampled_world[2]
    # Interior only: the slab and the in-plane blur read zeros beyond the truth grid's edge.
    interior = np.all([(sampled_world[a] > world[a].min() + 6) & (sampled_world[a] < world[a].max() - 6)
                       for a in range(3)], axis=0)
    assert interior.sum() > 50
    np.testing.assert_allclose(data.reshape(-1)[interior], expected[interior], rtol=1e-4)


def test_noise_matches_the_requested_white_matter_snr(template):
    clean = render(template, tissue_properties(3.0), SEQUENCES["T2w"], 3.0)
    wm = template.fraction("WM")
    for snr in (8.0, 30.0):
        noisy = add_rician_noise(clean, noise_sigma(clean, wm, snr), np.random.default_rng(0))
        region = wm >= 0.9
        measured = clean[region].mean() / (noisy - clean)[region].std()
        assert measured == pytest.approx(snr, rel=0.10)


def test_dataset_layout_and_sidecars(dataset):
    root, images = dataset
    assert os.path.isfile(os.path.join(root, "dataset_description.json"))
    with open(os.path.join(root, "participants.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    assert rows[0] == ["participant_id", "age", "sex", "site"] and [r[0] for r in rows[1:]] == ["sub-001", "sub-002"]
    for participant in ("001", "002"):
        anat = os.path.join(root, f"sub-{participant}", "anat")
        truth = [i for i in images if i.subject.participant_id == participant and i.acq is None]
        assert sorted(i.modality for i in truth) == sorted(MODALITIES)
        affines = {nib.load(i.path).affine.tobytes() for i in truth}
        assert len(affines) == 1  # every truth-grid contrast shares one grid
        assert os.path.isfile(os.path.join(anat, f"sub-{participant}_ce-gadolinium_T1w.nii.gz"))
        derivatives = os.path.join(root, "derivatives", "simulator", f"sub-{participant}", "anat")
        fractions = [nib.load(os.path.join(derivatives, f"sub-{participant}_label-{t}_probseg.nii.gz"))
                     for t in ("GM", "WM", "CSF")]
        assert all(f.affine.tobytes() in affines for f in fractions)
        total = sum(np.asarray(f.dataobj, dtype=np.float32) * f.dataobj.slope for f in fractions)
        assert 0.0 <= total.min() and total.max() <= 1.02
    brats = [i for i in images if i.subject.site == "BraTS2021"]
    assert brats[0].subject.tumour
    lesion = glob.glob(os.path.join(root, "derivatives", "simulator", "sub-001", "anat", "*label-enhancing*"))
    assert lesion
    for image in images:
        with open(image.path.replace(".nii.gz", ".json")) as f:
            sidecar = json.load(f)
        assert sidecar["RepetitionTime"] == pytest.approx(image.sequence.tr / 1000)
        assert sidecar["EchoTime"] == pytest.approx(image.sequence.te / 1000)
        assert ("InversionTime" in sidecar) == (image.sequence.ti is not None)
        assert sidecar["MagneticFieldStrength"] == image.subject.field_strength
        data = nib.load(image.path)
        assert data.get_data_dtype() == np.int16 and np.asarray(data.dataobj).min() >= 0


def test_low_resolution_acquisitions_share_world_space_with_the_truth(dataset):
    root, images = dataset
    low_res = [i for i in images if i.acq is not None]
    assert {i.acq for i in low_res} >= {"ax5mm", "cor3p2mm", "sag4mm"}
    for image in low_res:
        acquired = nib.load(image.path)
        truth = nib.load(next(i.path for i in images if i.acq is None and i.subject == image.subject))
        np.testing.assert_allclose(acquired.header.get_zooms(), image.voxel_size, rtol=1e-6)
        # The acquisition's field of view (voxel centres) lies inside the truth grid's, centred on it.
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in acquired.shape], indexing="ij")).reshape(3, -1)
        world = acquired.affine[:3, :3] @ corners + acquired.affine[:3, 3:4]
        in_truth = np.linalg.inv(truth.affine)[:3, :3] @ world + np.linalg.inv(truth.affine)[:3, 3:4]
        assert (in_truth > -1e-6).all() and (in_truth < np.array(truth.shape)[:, None] - 1 + 1e-6).all()
        centre = in_truth.mean(axis=1)
        np.testing.assert_allclose(centre, (np.array(truth.shape) - 1) / 2.0, atol=1e-6)


def test_bids_round_trip_reproduces_the_prompt(dataset):
    prompt = pytest.importorskip("scripts.prompt")
    root, images = dataset
    for image in images:
        seq = image.sequence
        expected = prompt.Prompt(image.modality, age=image.subject.age, sex=image.subject.sex,
                                 field_strength=image.subject.field_strength, manufacturer=image.subject.manufacturer,
                                 voxel_size=image.voxel_size, tr=seq.tr, te=seq.te, ti=seq.ti, fa=seq.fa)
        read = prompt.prompt_from_bids(image.path)
        assert read == expected, image.path
        assert prompt.Prompt.parse(read.render()) == expected
        # The sampled parameters were already at the prompt's precision: nothing was rounded away.
        assert (read.tr, read.te, read.ti) == (seq.tr, seq.te, seq.ti)


def test_same_seed_same_dataset_other_seed_differs(dataset, tmp_path):
    from scripts.simulator.presets import sample_subject
    root, images = dataset
    again = simulate(str(tmp_path), num_subjects=1, seed=3, sites=["BraTS2021"], voxel_mm=COARSE_MM, progress=False)
    first = next(i for i in images if i.modality == "T2w" and i.acq is None)
    same = next(i for i in again if i.modality == "T2w" and i.acq is None)
    assert same.sequence == first.sequence and same.subject == first.subject
    np.testing.assert_array_equal(np.asarray(nib.load(same.path).dataobj), np.asarray(nib.load(first.path).dataobj))
    preset = get_preset("BraTS2021")
    other = sample_subject(preset, "001", np.random.default_rng([4, 0]))
    assert other != first.subject


@pytest.mark.parametrize("kwargs,message", [
    ({"num_subjects": 0}, "num_subjects"),
    ({"num_subjects": -2}, "num_subjects"),
    ({"num_subjects": 1, "sites": ["Atlantis"]}, "site preset"),
    ({"num_subjects": 1, "seed": -1}, "seed"),
    ({"num_subjects": 1, "voxel_mm": 1.5}, "voxel_mm"),
])
def test_bad_arguments_give_one_line_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        simulate(str(tmp_path), progress=False, **kwargs)
    assert "\n" not in str(error.value)


def test_bad_sequence_and_geometry_give_one_line_errors():
    with pytest.raises(ValueError, match="TI"):
        Sequence("IR", 9000, 100)
    with pytest.raises(ValueError, match="MPRAGE"):
        Sequence("MPRAGE", 2300, 3, 300, 9)  # the readout does not fit before TI
    with pytest.raises(ValueError, match="orientation"):
        Geometry("oblique", 5.0)
    with pytest.raises(ValueError, match="site preset"):
        get_preset("nowhere")


def test_contrast_figure_is_written(dataset, tmp_path):
    from scripts.simulator.figure import save_contrast_figure
    root, _ = dataset
    path = save_contrast_figure(root, "001", str(tmp_path / "contrasts.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000


def test_config_runs_the_simulator(tmp_path):
    from monai.bundle import ConfigWorkflow
    config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bundle", "configs", "simulate.yaml")
    workflow = ConfigWorkflow(config_file=config, workflow_type=None, output_dir=str(tmp_path), num_subjects=1,
                              seed=0, voxel_mm=COARSE_MM, sites=["IXI"])
    workflow.initialize()
    workflow.run()
    assert len(glob.glob(str(tmp_path / "sub-001" / "anat" / "*.nii.gz"))) == len(MODALITIES) + 1  # + coronal PD


def _peak_over_p99(image, mask):
    from scripts.data.intensity import white_matter_peak
    return white_matter_peak(image[mask]) / np.percentile(image[mask], 99)


def test_realism_steps_move_the_statistics_real_scans_have(template):
    from scripts.simulator.realism import bright_tail, calibrate, quantise, thick_slice_resampling
    rng = np.random.default_rng(0)
    image = render(template, tissue_properties(3.0, 40, rng), SEQUENCES["T1w MPRAGE"], 3.0)
    mask = template.brain() > 0.5
    image = image / np.percentile(image[mask], 99)
    image = (image + rng.normal(0, 0.02, image.shape)).astype(np.float32) * mask
    # the bright tail lowers the WM peak relative to the 99th percentile (real T1w: 0.51, docs/sim_vs_real.md)
    assert _peak_over_p99(bright_tail(image, mask, rng, 0.02, 2.0), mask) < _peak_over_p99(image, mask) - 0.1
    # thick slices blur through-plane only: the z/xy neighbour-difference ratio drops (real case 0.56-0.76)

    def z_over_x(volume):
        return np.abs(np.diff(volume, axis=2)).mean() / np.abs(np.diff(volume, axis=0)).mean()

    blurred = thick_slice_resampling(image, 2, 4)
    assert blurred.shape == image.shape and z_over_x(blurred) < 0.8 * z_over_x(image)
    assert len(np.unique(quantise(image))) <= 256
    calibrated = calibrate(image, mask, rng)
    assert np.all(calibrated[~mask] == 0) and calibrated.dtype == np.float32


def test_truncated_kspace_rings_at_edges_and_the_full_kspace_does_not():
    from scripts.simulator.realism import gibbs_ringing

    image = np.zeros((8, 64, 48), np.float32)
    image[:, 20:44, 12:36] = 1.0  # a bright square in every slice: sharp edges in-plane
    assert np.allclose(gibbs_ringing(image, (1, 2), 1.0), image, atol=1e-5)
    ringing = gibbs_ringing(image, (1, 2), 0.6)
    inside = ringing[:, 20:44, 12:36]
    assert inside.max() > 1.05  # overshoot beside the edge (~9 % for a hard truncation)
    assert abs(inside[:, 10:14, 10:14].mean() - 1.0) < 0.03  # far from the edges the square keeps its level
    assert np.allclose(ringing[:, :, 0], ringing[:, :, 0][0]) and ringing.dtype == np.float32  # slices untouched


def test_motion_ghosts_spread_along_the_phase_axis_only_and_keep_the_energy():
    from scripts.simulator.realism import motion_ghosting

    image = np.zeros((40, 32, 16), np.float32)
    image[16:24, 12:20, 6:10] = 1.0
    lines = np.zeros(40, dtype=bool)
    assert np.allclose(motion_ghosting(image, 0, lines, 2.0), image, atol=1e-6)
    lines[::4] = True  # a quarter of the lines, the head 2 voxels away
    ghosted = motion_ghosting(image, 0, lines, 2.0)
    assert ghosted[:10, 12:20, 6:10].max() > 0.05  # ghosts far from the object along the phase-encode axis
    assert np.abs(ghosted[:, :12]).max() < 1e-5 and np.abs(ghosted[:, :, :6]).max() < 1e-5  # not across it
    np.testing.assert_allclose((ghosted**2).sum(), (image**2).sum(), rtol=1e-4)  # a phase change moves energy only


def test_registration_resampling_undershoots_like_the_real_cases_int16_images():
    from scripts.simulator.acquisition import to_scanner_scale
    from scripts.simulator.realism import quantise, registration_resampling

    image = np.full((24, 24, 24), 0.05, np.float32)  # dark CSF-like background inside the brain
    image[8:16, 8:16, 8:16] = 1.0
    assert np.allclose(registration_resampling(image, (0.0, 0.0, 0.0)), image, atol=1e-6)
    moved = registration_resampling(image, (0.5, 0.3, 0.0))
    assert moved.min() < 0.0  # the cubic kernel's negative lobes undershoot below the dark side of an edge
    assert abs(moved[4:20, 4:20, 4:20].sum() - image[4:20, 4:20, 4:20].sum()) < 1e-2 * image.sum()
    stored = to_scanner_scale(moved, np.random.default_rng(0), signed=True)
    assert stored.dtype == np.int16 and stored.min() < 0  # kept by signed storage (the realism mode's) ...
    assert to_scanner_scale(moved, np.random.default_rng(0)).min() == 0  # ... clipped by the scanner's
    assert quantise(moved).min() == 0.0  # 8-bit storage is unsigned


def test_realism_option_keeps_the_clean_subject_and_is_off_by_default(dataset, tmp_path):
    root, images = dataset
    real_like = simulate(str(tmp_path), num_subjects=1, seed=3, sites=["BraTS2021"], voxel_mm=COARSE_MM,
                         progress=False, realism=True)
    first = next(i for i in images if i.modality == "T1w" and i.acq is None)
    same = next(i for i in real_like if i.modality == "T1w" and i.acq is None)
    assert same.sequence == first.sequence and same.subject == first.subject  # its own generator: same draws
    clean, artefacts = (np.asarray(nib.load(i.path).dataobj, np.float32) for i in (first, same))
    mask = (clean > 0) & (artefacts > 0)
    assert _peak_over_p99(artefacts, mask) < _peak_over_p99(clean, mask)
    # stored signed, as the real case is: the resampling's undershoot survives (clean images have no value below 0)
    assert any(np.asarray(nib.load(i.path).dataobj).min() < 0 for i in real_like)
    assert all(np.asarray(nib.load(i.path).dataobj).min() >= 0 for i in images)


def test_realism_share_alternates_subjects_and_workers_make_the_same_dataset(dataset, tmp_path):
    assert realism_subjects(4, 0.5) == [False, True, False, True] and realism_subjects(3, "true") == [True] * 3
    assert realism_subjects(2, "0") == [False, False]
    for bad in (1.5, "often"):
        with pytest.raises(ValueError, match="realism: expected true"):
            realism_subjects(2, bad)
    root, images = dataset  # clean subjects of the same seed and sites
    mixed = simulate(str(tmp_path / "mixed"), num_subjects=2, seed=3, sites=["BraTS2021", "clinical"],
                     voxel_mm=COARSE_MM, progress=False, realism=0.5, workers=2)
    assert [i.path.replace(str(tmp_path / "mixed"), "") for i in mixed] == [i.path.replace(root, "") for i in images]
    pixels = [(np.asarray(nib.load(a.path).dataobj), np.asarray(nib.load(b.path).dataobj))
              for a, b in zip(images, mixed) if a.modality == "T1w" and a.acq is None]
    assert np.array_equal(*pixels[0]) and not np.array_equal(*pixels[1])  # only the second subject has realism
    assert (tmp_path / "mixed" / "participants.tsv").read_text() == open(os.path.join(root, "participants.tsv")).read()


@pytest.mark.parametrize("field_strength", [1.5, 3.0])
def test_realism_tissue_ranges_keep_the_contrast_the_prompt_asks_for(field_strength):
    """Per-subject tissue variation stays within the published spread and never overturns what the sequence
    parameters determine: the literature orderings hold for every draw, on the signal equations of each tissue."""
    from scripts.simulator.realism import RealismRanges, magnetisation_transfer, vary_tissue
    from scripts.simulator.sequences import tissue_signal

    ranges, rng = RealismRanges(), np.random.default_rng(7)
    base = tissue_properties(field_strength)
    t1w = SEQUENCES["T1w MPRAGE"] if field_strength == 3.0 else Sequence("MPRAGE", 2000, 3.5, 800, 10)  # 1.5 T timing
    for _ in range(200):
        varied = vary_tissue(base, rng)
        limit = ranges.t1_spread + ranges.t1_class_spread
        assert np.exp(-limit) <= varied["WM"].t1 / base["WM"].t1 <= np.exp(limit)
        gm_over_wm = (varied["cGM"].t1 / varied["WM"].t1) / (base["cGM"].t1 / base["WM"].t1)
        assert np.exp(-2 * ranges.t1_class_spread) <= gm_over_wm <= np.exp(2 * ranges.t1_class_spread)
        mt = magnetisation_transfer(varied, ranges.mt_saturation[1])
        signal = {name: {t: tissue_signal(seq, props[t]) for t in ("WM", "cGM", "CSF")}
                  for name, seq, props in (("T1w", t1w, varied), ("T2w", SEQUENCES["T2w"], mt),
                                           ("FLAIR", SEQUENCES["FLAIR"], mt))}
        assert signal["T1w"]["WM"] > signal["T1w"]["cGM"] > signal["T1w"]["CSF"]
        assert signal["T2w"]["CSF"] > signal["T2w"]["cGM"] > signal["T2w"]["WM"]
        assert signal["FLAIR"]["CSF"] < signal["FLAIR"]["WM"]
    mt = magnetisation_transfer(base, 0.3)  # bound-pool saturation: WM loses most, CSF nothing
    assert mt["CSF"] == base["CSF"] and mt["WM"].pd == pytest.approx(0.7 * base["WM"].pd)
    assert mt["WM"].pd / base["WM"].pd < mt["cGM"].pd / base["cGM"].pd < 1.0


REAL = os.path.normpath(os.path.join(BUNDLE_ROOT, "..", "..", "shared", "data", "real", "bids"))
SIM_VS_REAL_DOC = os.path.join(os.path.dirname(BUNDLE_ROOT), "docs", "sim_vs_real.md")


@pytest.mark.skipif(not os.path.isdir(REAL), reason="the real case (../shared/data/real) is absent")
def test_realism_covers_the_real_case_where_the_doc_says_so():
    """docs/sim_vs_real.md's 2 mm table, recomputed: every real value of a row marked covered lies inside the range
    of the subjects simulated with realism=True (one per training site, 2 mm grid, real case block-averaged)."""
    from sim_vs_real import COARSE_CHECK, COARSE_HEADING, claimed_rows, coarse_statistics, uncovered

    with open(SIM_VS_REAL_DOC) as handle:
        claimed = claimed_rows(handle.read(), COARSE_HEADING)
    assert len(claimed) >= 20  # most of the 28 rows
    real, simulated = coarse_statistics(REAL, **COARSE_CHECK)
    missed = [(contrast, statistic, value) for contrast, statistic, value in uncovered(real, simulated)
              if (contrast, statistic) in claimed]
    assert not missed


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(REAL), reason="the real case (../shared/data/real) is absent")
def test_realism_covers_the_real_case_at_1mm_where_the_doc_says_so():
    """The done-bar table of docs/sim_vs_real.md (1 mm, 27 realism subjects), recomputed (about 15 min)."""
    from sim_vs_real import (
        HEADING,
        REALISM_CHECK,
        claimed_rows,
        dataset_statistics,
        realism_statistics,
        uncovered,
    )

    with open(SIM_VS_REAL_DOC) as handle:
        claimed = claimed_rows(handle.read(), HEADING)
    assert len(claimed) == 28  # every row (docs/sim_vs_real.md)
    real, simulated = dataset_statistics(REAL, label="real"), realism_statistics(**REALISM_CHECK)
    assert not [row for row in uncovered(real, simulated) if row[:2] in claimed]
