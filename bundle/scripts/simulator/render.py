"""Noise-free images: the partial-volume sum of per-tissue signals (plus the SWI phase mask)."""

from __future__ import annotations

import numpy as np

from .anatomy import Anatomy
from .sequences import Sequence, swi_phase_mask, tissue_signal
from .tissue import TissueProperties


def render(anatomy: Anatomy, properties: dict[str, TissueProperties], sequence: Sequence,
           field_strength: float) -> np.ndarray:
    """``sum_t fraction_t * S(sequence, tissue_t)``: each voxel mixes the signals of the tissues it contains."""
    image = np.zeros(anatomy.shape, np.float32)
    for name, fraction in anatomy.fractions.items():
        image += np.float32(tissue_signal(sequence, properties[name])) * fraction
    if sequence.kind == "SWI":
        chi = np.zeros(anatomy.shape, np.float32)
        for name, fraction in anatomy.fractions.items():
            chi += np.float32(properties[name].chi) * fraction
        image *= swi_phase_mask(chi, sequence.te, field_strength, anatomy.voxel_mm)
    return image
