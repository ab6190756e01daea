"""The at-a-glance realism figure: one subject, seven contrasts, three orthogonal views."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from .bids import _atomic_write, image_stem
from .presets import MODALITIES


def save_contrast_figure(dataset_dir: str, participant_id: str, output_png: str) -> str:
    """Axial, coronal and sagittal mid-brain slices of the subject's seven truth-grid contrasts, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = os.path.join(dataset_dir, f"sub-{participant_id}", "anat")
    paths = [os.path.join(folder, image_stem(participant_id, m) + ".nii.gz") for m in MODALITIES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{missing[0]}: expected this simulated image (run the simulator first)")
    figure, axes = plt.subplots(3, len(MODALITIES), figsize=(2.2 * len(MODALITIES), 7.2), facecolor="black")
    for column, (modality, path) in enumerate(zip(MODALITIES, paths)):
        volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        top = np.percentile(volume[volume > 0], 99.5)
        centre = [int(np.mean(np.nonzero(volume.any(axis=tuple(a for a in range(3) if a != axis)))[0]))
                  for axis in range(3)]
        # RAS arrays: transpose and flip so superior / anterior is up, as radiologists view them.
        views = (volume[:, :, centre[2]].T, volume[:, centre[1], :].T, volume[centre[0], :, :].T)
        for row, view in enumerate(views):
            ax = axes[row, column]
            ax.imshow(np.flipud(view), cmap="gray", vmin=0, vmax=top, interpolation="nearest")
            ax.axis("off")
        axes[0, column].set_title(modality, color="white", fontsize=11)
    figure.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.01, wspace=0.02, hspace=0.02)
    _atomic_write(output_png, lambda p: figure.savefig(p, dpi=90, facecolor="black", format="png"))
    plt.close(figure)
    return output_png
