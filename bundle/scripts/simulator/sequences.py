"""MR signal equations: the magnitude each pulse sequence gives a tissue of known T1, T2, T2* and PD.

Times in ms, flip angles in degrees. Every equation is evaluated per tissue class and the image is the partial-volume
sum (``scripts.simulator.render``), so these functions take scalars or arrays alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .tissue import TissueProperties

SEQUENCE_KINDS = ("SE", "IR", "MPRAGE", "GRE", "SWI")
GYROMAGNETIC_HZ_PER_T = 42.577e6  # 1H, gamma / (2 pi)


@dataclass(frozen=True)
class Sequence:
    """One acquisition's contrast parameters (what a BIDS sidecar records).

    ``kind``: SE (spin echo / turbo spin echo: T1w SE, T2w, PD), IR (inversion recovery, FLAIR), MPRAGE (3D
    inversion-prepared gradient echo; ``tr`` is the inversion repetition time as vendors report it, ``echo_spacing``
    the readout's excitation TR), GRE (spoiled gradient echo), SWI (GRE magnitude weighted by its phase mask).
    """

    kind: str
    tr: float
    te: float
    ti: float | None = None
    fa: float = 90.0
    echo_spacing: float = 7.0
    train_length: int = 176

    def __post_init__(self) -> None:
        if self.kind not in SEQUENCE_KINDS:
            raise ValueError(f"sequence kind: expected one of {SEQUENCE_KINDS}, got {self.kind!r}")
        if not (self.tr > 0 and 0 <= self.te < self.tr and 0 < self.fa <= 180):
            raise ValueError(f"sequence {self.kind}: expected TR > TE >= 0 ms and 0 < FA <= 180, got "
                             f"TR={self.tr}, TE={self.te}, FA={self.fa}")
        if self.kind in ("IR", "MPRAGE") and not (self.ti is not None and 0 < self.ti < self.tr):
            raise ValueError(f"sequence {self.kind}: expected 0 < TI < TR ms, got TI={self.ti}, TR={self.tr}")
        if self.kind == "MPRAGE" and min(self.readout_start, self.recovery) < 0:
            raise ValueError(f"sequence MPRAGE: a {self.train_length}-pulse readout at {self.echo_spacing} ms does not "
                             f"fit TI={self.ti} ms / TR={self.tr} ms")

    @property
    def readout_start(self) -> float:
        """MPRAGE: time from the inversion to the first readout pulse (TI is defined at the centre of k-space)."""
        return float(self.ti) - (self.train_length // 2) * self.echo_spacing

    @property
    def recovery(self) -> float:
        """MPRAGE: time from the last readout pulse to the next inversion."""
        return self.tr - self.readout_start - (self.train_length - 1) * self.echo_spacing


def spin_echo(pd, t1, t2, tr, te):
    """``PD (1 - exp(-TR/T1)) exp(-TE/T2)`` (90-180 spin echo, TR >> TE)."""
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery(pd, t1, t2, tr, te, ti):
    """Magnitude IR: ``PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)``; nulls a tissue at TI = T1 ln 2 (TR >> T1)."""
    return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def spoiled_gradient_echo(pd, t1, t2star, tr, te, fa):
    """Ernst equation: ``PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE/T2*)``, ``E1 = exp(-TR/T1)``."""
    alpha = np.deg2rad(fa)
    e1 = np.exp(-tr / t1)
    return pd * np.sin(alpha) * (1.0 - e1) / (1.0 - np.cos(alpha) * e1) * np.exp(-te / t2star)


def mprage(pd, t1, t2star, seq: Sequence):
    """MPRAGE steady state, exact for ideal pulses and perfect spoiling.

    One inversion period is an affine map of the longitudinal magnetisation ``Mz -> a Mz + b`` (relaxation
    ``Mz -> Mz E + 1 - E``, excitation ``Mz -> Mz cos a``, inversion ``Mz -> -Mz``); its fixed point ``b / (1 - a)``
    is the steady state (the same result as the closed form of Deichmann et al., NeuroImage 2000, 12:112-127). The
    signal is the transverse magnetisation of the centre (k = 0) pulse, ``Mz sin(a) exp(-TE/T2*)``.
    """
    t1 = np.asarray(t1, dtype=np.float64)
    cos_a, sin_a = np.cos(np.deg2rad(seq.fa)), np.sin(np.deg2rad(seq.fa))
    centre = seq.train_length // 2

    def relax(a, b, dt):
        e = np.exp(-dt / t1)
        return a * e, b * e + 1.0 - e

    # Map from "just before the inversion" to "just before the centre pulse", then on to the next inversion.
    a, b = -np.ones_like(t1), np.zeros_like(t1)
    a, b = relax(a, b, seq.readout_start)
    for _ in range(centre):
        a, b = relax(a * cos_a, b * cos_a, seq.echo_spacing)
    a_centre, b_centre = a, b
    for _ in range(seq.train_length - centre - 1):
        a, b = relax(a * cos_a, b * cos_a, seq.echo_spacing)
    a, b = relax(a * cos_a, b * cos_a, seq.recovery)
    steady = b / (1.0 - a)
    mz_centre = a_centre * steady + b_centre
    return pd * np.abs(mz_centre) * sin_a * np.exp(-seq.te / t2star)


def tissue_signal(seq: Sequence, tissue: TissueProperties) -> float:
    """The magnitude signal of a pure tissue voxel (before the SWI phase mask, coil gain, bias and noise)."""
    if seq.kind == "SE":
        return float(spin_echo(tissue.pd, tissue.t1, tissue.t2, seq.tr, seq.te))
    if seq.kind == "IR":
        return float(inversion_recovery(tissue.pd, tissue.t1, tissue.t2, seq.tr, seq.te, seq.ti))
    if seq.kind == "MPRAGE":
        return float(mprage(tissue.pd, tissue.t1, tissue.t2star, seq))
    return float(spoiled_gradient_echo(tissue.pd, tissue.t1, tissue.t2star, seq.tr, seq.te, seq.fa))


def field_shift_ppm(chi_ppm: np.ndarray) -> np.ndarray:
    """Field perturbation (ppm of B0) of a susceptibility map, B0 along the third (superior) axis.

    Fourier-domain dipole convolution ``dB/B0 = IFFT[(1/3 - kz^2/k^2) FFT(chi)]`` (Salomir et al., Concepts Magn Reson
    B 2003, 19:26-34; Marques & Bowtell, Concepts Magn Reson B 2005, 25:65-78).
    """
    k = np.meshgrid(*(np.fft.fftfreq(n) for n in chi_ppm.shape[:2]), np.fft.rfftfreq(chi_ppm.shape[2]), indexing="ij")
    k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        dipole = np.where(k2 > 0, 1.0 / 3.0 - k[2] ** 2 / k2, 0.0)
    return np.fft.irfftn(np.fft.rfftn(chi_ppm) * dipole, s=chi_ppm.shape).astype(np.float32)


def swi_phase_mask(chi_ppm: np.ndarray, te_ms: float, field_strength: float, voxel_mm: float,
                   power: int = 4, highpass_mm: float = 4.0) -> np.ndarray:
    """Haacke et al., MRM 2004, 52:612-618: the high-pass filtered phase ``phi = -2 pi gamma dB TE`` becomes a mask
    ``(pi + phi) / pi`` for negative phase (1 elsewhere) that multiplies the magnitude ``power`` times, darkening
    paramagnetic veins and iron-rich nuclei. The Gaussian high-pass stands in for the scanner's homodyne filter."""
    phase = -2.0 * np.pi * GYROMAGNETIC_HZ_PER_T * field_strength * 1e-6 * field_shift_ppm(chi_ppm) * te_ms * 1e-3
    phase = phase - ndimage.gaussian_filter(phase, highpass_mm / voxel_mm)
    mask = np.clip((np.pi + phase) / np.pi, 0.0, 1.0)
    return (mask ** power).astype(np.float32)
