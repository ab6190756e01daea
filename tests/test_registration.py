"""Co-registration and masking of real data: a known rigid motion between two contrasts is recovered."""

import json
import math
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from scripts.data import registration

SPACING = 2.0  # mm; a 40^3 volume at 2 mm covers a small brain-sized field of view quickly
SIZE = 40
ROTATION_DEG = (4.0, -3.0, 5.0)  # about x, y, z
TRANSLATION_MM = (3.0, -4.0, 2.5)


def _tissue_labels():
    """0 background, 1-3 tissues: smooth random blobs inside an ellipsoid head (asymmetric, so rotations show)."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE) - SIZE / 2 + 0.5] * 3, indexing="ij"), -1)
    head = np.linalg.norm(grid / np.array([15.0, 17.0, 13.0]), axis=-1) < 1
    texture = ndimage.gaussian_filter(rng.standard_normal((SIZE,) * 3), 2.5)
    return np.where(head, 1 + np.digitize(texture, np.quantile(texture[head], [0.33, 0.66])), 0)


def _rotation(degrees):
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """A T1w-like reference, a T2w-like image moved by a known rigid motion about the centre, a brain mask.

    The moving image samples the tissue map at ``R (x - c) + c + t`` for every reference point x: the transform the
    registration must report (it maps reference points onto the moving image)."""
    folder = tmp_path_factory.mktemp("subject")
    labels = _tissue_labels()
    affine = np.diag([SPACING] * 3 + [1.0])
    t1 = np.array([0.0, 0.9, 0.6, 0.3])[labels] * 1000
    t2 = np.array([0.0, 0.3, 0.7, 1.0])[labels] * 1000  # another contrast: only mutual information links them
    rotation, centre = _rotation(ROTATION_DEG), np.full(3, (SIZE - 1) / 2 * SPACING)
    # moving(y) = t2 at x with y = R (x - c) + c + t  ->  x = R^T (y - c - t) + c, in voxels (/ SPACING)
    matrix = rotation.T
    offset = (centre - rotation.T @ (centre + np.array(TRANSLATION_MM))) / SPACING
    moved = ndimage.affine_transform(t2, matrix, offset=offset, order=1)
    paths = {}
    for name, volume in (("T1w", t1), ("T2w", moved), ("desc-brain_mask", (labels > 0).astype(np.float32))):
        paths[name] = str(folder / f"sub-01_{name}.nii.gz")
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), paths[name])
    json.dump({"RepetitionTime": 3.2, "EchoTime": 0.1}, open(folder / "sub-01_T2w.json", "w"))
    return paths, rotation, centre


def test_recovers_a_known_rigid_motion_and_masks(subject, tmp_path):
    import itk

    paths, rotation, centre = subject
    outputs = registration.register_subject(paths["T1w"], [paths["T2w"]], str(tmp_path / "out"),
                                            mask=paths["desc-brain_mask"])
    found = itk.transformread(str(tmp_path / "out" / "sub-01_T2w_to-reference.tfm"))[0]
    # compare where both transforms send points spread over the head (physical mm, ITK's LPS = nifti RAS here
    # up to the sign of x and y, which cancels as both transforms are compared in the same frame)
    flip = np.diag([-1.0, -1.0, 1.0])
    errors = []
    for corner in np.array(np.meshgrid(*[[-20.0, 20.0]] * 3)).reshape(3, -1).T:
        point = centre + corner
        expected = rotation @ (point - centre) + centre + np.array(TRANSLATION_MM)
        mapped = flip @ np.array(found.TransformPoint((flip @ point).tolist()))
        errors.append(np.linalg.norm(mapped - expected))
    assert max(errors) < 1.0, errors  # mm, at 20-35 mm from the centre: also bounds the rotation error
    matrix = flip @ np.array(found.GetMatrix()).reshape(3, 3) @ flip
    angle = np.degrees(np.arccos(np.clip((np.trace(matrix @ rotation.T) - 1) / 2, -1, 1)))
    assert angle < 1.0, angle

    registered = nib.load(outputs[paths["T2w"]]).get_fdata()
    mask = nib.load(paths["desc-brain_mask"]).get_fdata() > 0
    assert registered.shape == (SIZE,) * 3 and not registered[~mask].any()  # on the reference grid, masked
    labels = _tissue_labels()
    inner = ndimage.binary_erosion(labels == 3, iterations=1)  # away from interpolated edges
    assert abs(np.median(registered[inner]) - 1000) < 50  # the T2w's brightest tissue is back where it belongs
    assert os.path.isfile(tmp_path / "out" / "sub-01_T2w.json")  # its sidecar travels with it
    assert nib.load(paths["T2w"]).get_fdata().any()  # inputs untouched


def test_refuses_to_overwrite_inputs_and_bad_masks(subject, tmp_path):
    paths, _, _ = subject
    with pytest.raises(ValueError, match="overwrite an input"):
        registration.register_subject(paths["T1w"], [paths["T2w"]], os.path.dirname(paths["T1w"]))
    small = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), small)
    with pytest.raises(ValueError, match="reference grid"):
        registration.register_subject(paths["T1w"], [paths["T2w"]], str(tmp_path / "out"), mask=str(small))
    with pytest.raises(ValueError, match="transform"):
        registration.register(None, None, transform="bspline")
