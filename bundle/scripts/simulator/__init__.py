"""MR-physics simulator: MNI152 anatomy -> tissue properties -> signal equations -> acquisition -> BIDS dataset.

Modules: ``anatomy`` (tissue fractions per subject), ``tissue`` (T1/T2/T2*/PD tables), ``sequences`` (signal
equations), ``render`` (partial-volume images), ``acquisition`` (bias, skull strip, slices, noise, storage),
``presets`` (site protocols), ``bids`` (writing), ``generate`` (``simulate``), ``figure`` (the contrast figure).
"""

from .generate import SimulatedImage, simulate, simulate_subject

__all__ = ["SimulatedImage", "simulate", "simulate_subject"]
