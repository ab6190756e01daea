"""PNG preview of a synthesis: three orthogonal views of the input, the synthesized image and, with a reference,
the reference and the absolute error map (the layout of the paper's Fig. 3).

Every panel is sampled in world space on the central planes of the synthesized grid (reoriented to RAS+ so the
views are sagittal, coronal and axial whatever the file's orientation), so an anisotropic input and a reference on
another grid line up with the synthesized image.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # file output only: no display on servers

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy.ndimage import map_coordinates  # noqa: E402

from ..data.intensity import normalize_intensity  # noqa: E402
from .volume_io import Volume, atomic_path  # noqa: E402

VIEWS = ("sagittal", "coronal", "axial")


def central_planes(shape, affine) -> list[tuple[np.ndarray, float]]:
    """Sagittal, coronal and axial central planes of a grid: world coordinates ``[n1, n2, 3]`` and the pixel
    aspect ratio (voxel size along the second free axis over the first) that shows them undistorted."""
    orientation = nib.orientations.io_orientation(affine)
    canonical_affine = affine @ nib.orientations.inv_ornt_aff(orientation, shape)
    canonical_shape = [0, 0, 0]
    for axis, (target_axis, _) in enumerate(orientation):
        canonical_shape[int(target_axis)] = int(shape[axis])
    planes = []
    for fixed in range(3):  # x (sagittal), y (coronal), z (axial) held at the centre
        free = [a for a in range(3) if a != fixed]
        grids = np.meshgrid(*[np.arange(canonical_shape[a]) for a in free], indexing="ij")
        index = np.zeros((*grids[0].shape, 3))
        index[..., fixed] = (canonical_shape[fixed] - 1) / 2
        index[..., free[0]], index[..., free[1]] = grids
        spacing = np.linalg.norm(canonical_affine[:3, :3], axis=0)
        world = index @ canonical_affine[:3, :3].T + canonical_affine[:3, 3]
        planes.append((world, spacing[free[1]] / spacing[free[0]]))
    return planes


def sample_plane(array: np.ndarray, affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Trilinear samples of ``array`` at world points ``[..., 3]`` (edge values continue outside the voxel centres)."""
    index = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    return map_coordinates(array, np.moveaxis(index, -1, 0), order=1, mode="nearest")


def save_preview(path: str, source: Volume, synthesized: np.ndarray, affine: np.ndarray,
                 reference: Volume | None = None) -> None:
    """Write the preview PNG atomically; intensities are shown normalised (brain 99th percentile = 1)."""
    volumes = [("input", normalize_intensity(source.array), source.affine), ("synthesized", synthesized, affine)]
    if reference is not None:
        volumes.append(("reference", normalize_intensity(reference.array), reference.affine))
    planes = central_planes(synthesized.shape, affine)
    panels = {name: [sample_plane(array, grid, plane) for plane, _ in planes] for name, array, grid in volumes}
    if reference is not None:
        panels["|error|"] = [np.abs(s - r) for s, r in zip(panels["synthesized"], panels["reference"])]

    figure, axes = plt.subplots(3, len(panels), figsize=(2.6 * len(panels), 7.5), squeeze=False)
    for column, (name, images) in enumerate(panels.items()):
        colormap, top = ("magma", 0.5) if name == "|error|" else ("gray", 1.2)
        for row, image in enumerate(images):
            axis = axes[row, column]
            axis.imshow(image.T, origin="lower", cmap=colormap, vmin=0, vmax=top, interpolation="nearest",
                        aspect=planes[row][1])
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name)
            if column == 0:
                axis.set_ylabel(VIEWS[row])
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
