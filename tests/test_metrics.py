"""Evaluation measures: known values on crafted images."""

import numpy as np
import pytest

from scripts.engine.metrics import compare, oracle_lookup_table, pearson, psnr, ssim, tissue_volumes


@pytest.fixture
def brain():
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    mask = radius < 0.8
    image = np.where(radius < 0.3, 1.0, np.where(radius < 0.55, 0.6, 0.2)) * mask
    return image.astype(np.float32), mask, rng


def test_psnr_known_value(brain):
    image, mask, _ = brain
    noisy = image + 0.1 * mask  # constant error 0.1 inside the brain -> MSE 0.01 -> 20 dB
    assert psnr(noisy, image, mask) == pytest.approx(20.0, abs=1e-4)
    assert psnr(image, image, mask) == float("inf")


def test_ssim_is_one_for_identity_and_drops_with_noise(brain):
    image, mask, rng = brain
    assert ssim(image, image, mask) == pytest.approx(1.0, abs=1e-5)
    noisy = image + rng.normal(0, 0.2, image.shape).astype(np.float32) * mask
    assert ssim(noisy, image, mask) < 0.8


def test_pearson_and_compare_ignore_scale(brain):
    image, mask, _ = brain
    assert pearson(3 * image + 5, image, mask) == pytest.approx(1.0)
    scores = compare(1000.0 * image, image, mask)  # a scanner's arbitrary scale is normalised away
    assert scores["psnr"] > 60 and scores["ssim"] > 0.999


def test_oracle_lut_reaches_the_best_voxelwise_mapping(brain):
    image, mask, rng = brain
    target = np.where(image > 0.5, 0.1, 0.9).astype(np.float32) * mask  # an inverted, non-monotonic-free mapping
    mapped = oracle_lookup_table(image, target, mask)
    assert pearson(mapped, target, mask) > 0.999
    # with target noise independent of the source, no mapping can explain it: r falls clearly below 1
    noisy = target + rng.normal(0, 0.3, target.shape).astype(np.float32) * mask
    assert pearson(oracle_lookup_table(image, noisy, mask), noisy, mask) < 0.9


def test_tissue_volumes_recover_three_classes(brain):
    image, mask, rng = brain
    noisy = image + rng.normal(0, 0.03, image.shape) * mask
    volumes = tissue_volumes(noisy, mask, voxel_volume_ml=0.001)
    expected = [np.sum(mask & (image == v)) * 0.001 for v in (0.2, 0.6, 1.0)]
    np.testing.assert_allclose(volumes, expected, rtol=0.02)
