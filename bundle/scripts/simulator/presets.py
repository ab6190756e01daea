"""Site protocol presets: distributions of scanner, protocol and population that mimic the paper's training sites.

Ranges are approximate values from each dataset's published acquisition protocol (OASIS-3: LaMontagne et al.,
medRxiv 2019; HCP: Glasser et al., NeuroImage 2013 and Harms et al., NeuroImage 2018; IXI: brain-development.org;
BCP: Howell et al., NeuroImage 2019; ADNI: Jack et al., JMRI 2008; AIBL: Ellis et al., Int Psychogeriatr 2009;
BraTS 2021: Baid et al., arXiv:2107.02314) and typical clinical protocols. Every site is simulated with all seven
contrasts on the 1 mm truth grid (with that site's scanner and parameter ranges); ``clinical`` lists the extra
thick-slice acquisitions a site contributes. Where a real site used a 3D variable-flip-angle T2w/FLAIR (SPACE/CUBE),
the preset uses the turbo-spin-echo equivalent contrast parameters, since the simulator's equations are 2D ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .acquisition import Geometry
from .sequences import Sequence

MODALITIES = ("T1w", "T2w", "FLAIR", "SWI", "T2star", "PD", "T1CE")  # the prompt layer's names, in its order


@dataclass(frozen=True)
class Protocol:
    """Parameter ranges (uniform) of one contrast: times in ms, flip angle in degrees, SNR on white matter."""

    kind: str
    tr: tuple[float, float]
    te: tuple[float, float]
    ti: tuple[float, float] | None = None
    fa: tuple[float, float] = (90.0, 90.0)
    snr: tuple[float, float] = (25.0, 40.0)

    def sample(self, rng: np.random.Generator) -> tuple[Sequence, float]:
        """A sequence drawn from the ranges, rounded the way the prompt prints it, and its SNR."""
        draw = lambda bounds: prompt_round(rng.uniform(*bounds))  # noqa: E731
        tr, te, fa = draw(self.tr), draw(self.te), float(round(rng.uniform(*self.fa)))
        ti = None if self.ti is None else draw(self.ti)
        return Sequence(self.kind, tr, te, ti, fa), float(rng.uniform(*self.snr))


def prompt_round(value: float) -> float:
    """Two decimals, whole numbers from 100 up: the precision of the prompt, so a sidecar reproduces it exactly."""
    return float(round(value)) if abs(value) >= 100 else round(float(value), 2)


_ORIENTATION_LABEL = {"axial": "ax", "coronal": "cor", "sagittal": "sag"}


@dataclass(frozen=True)
class ClinicalAcquisition:
    modality: str
    geometry: Geometry
    protocol: Protocol | None = None  # None: the site's own protocol for that modality

    @property
    def label(self) -> str:
        """BIDS ``acq-`` label, e.g. ``ax5mm``, ``cor3p2mm``."""
        thickness = f"{self.geometry.thickness_mm:g}".replace(".", "p")
        return f"{_ORIENTATION_LABEL[self.geometry.orientation]}{thickness}mm"


@dataclass(frozen=True)
class SitePreset:
    name: str
    field_strengths: tuple[float, ...]
    manufacturers: tuple[str, ...]
    age_range: tuple[float, float]
    protocols: dict[str, Protocol]
    clinical: tuple[ClinicalAcquisition, ...] = ()
    tumour_probability: float = 0.0
    wmh_probability: float = 0.0
    bias_strength: tuple[float, float] = (0.05, 0.2)


# Typical protocols per field strength; sites override what their published protocols fix.
# 3 T: MPRAGE TR/TE/TI/FA 2300/2.98/900/9 (ADNI), FLAIR TI near the CSF null (TI ~ T1_csf ln 2 for long TR).
_BASE_3T = {
    "T1w": Protocol("MPRAGE", (2200, 2500), (2.0, 3.5), (850, 1100), (8, 9)),
    "T2w": Protocol("SE", (3000, 6000), (80, 110)),
    "FLAIR": Protocol("IR", (8000, 11000), (85, 130), (2300, 2600)),
    "SWI": Protocol("SWI", (27, 35), (18, 25), None, (12, 17)),
    "T2star": Protocol("GRE", (500, 800), (15, 25), None, (18, 25)),
    "PD": Protocol("SE", (2500, 4000), (8, 15)),
    "T1CE": Protocol("MPRAGE", (2200, 2500), (2.0, 3.5), (850, 1100), (8, 9)),
}
# 1.5 T: shorter T1s need a shorter MPRAGE TI; SWI uses TE ~40 ms because phase grows with field x TE.
_BASE_15T = {
    "T1w": Protocol("MPRAGE", (1900, 2200), (3.0, 4.5), (700, 1000), (8, 12)),
    "T2w": Protocol("SE", (3500, 6000), (90, 120)),
    "FLAIR": Protocol("IR", (8000, 10000), (100, 140), (2100, 2500)),
    "SWI": Protocol("SWI", (45, 55), (35, 45), None, (15, 20)),
    "T2star": Protocol("GRE", (600, 900), (20, 30), None, (18, 25)),
    "PD": Protocol("SE", (2500, 4000), (10, 18)),
    "T1CE": Protocol("SE", (450, 650), (8, 15)),
}
_SPIN_ECHO_T1 = Protocol("SE", (450, 700), (8, 15))
_AX5 = Geometry("axial", 5.0, 0.9, 1.0)


def _protocols(base: dict[str, Protocol], **changes: Protocol) -> dict[str, Protocol]:
    return {**base, **changes}


PRESETS: dict[str, SitePreset] = {p.name: p for p in (
    SitePreset("OASIS", (3.0, 1.5), ("Siemens",), (42, 95),
               _protocols(_BASE_3T, T1w=Protocol("MPRAGE", (2400, 2400), (3.16, 3.16), (1000, 1000), (8, 8))),
               clinical=(ClinicalAcquisition("FLAIR", Geometry("axial", 5.0, 0.9, 0.0)),), wmh_probability=0.4),
    SitePreset("HCP-YA", (3.0,), ("Siemens",), (22, 35),
               _protocols(_BASE_3T, T1w=Protocol("MPRAGE", (2400, 2400), (2.14, 2.14), (1000, 1000), (8, 8)))),
    SitePreset("HCP-D", (3.0,), ("Siemens",), (5, 21),
               _protocols(_BASE_3T, T1w=Protocol("MPRAGE", (2500, 2500), (1.8, 2.2), (1000, 1000), (8, 8)))),
    SitePreset("HCP-A", (3.0,), ("Siemens",), (36, 100),
               _protocols(_BASE_3T, T1w=Protocol("MPRAGE", (2500, 2500), (1.8, 2.2), (1000, 1000), (8, 8))),
               wmh_probability=0.4),
    SitePreset("IXI", (1.5, 3.0), ("Philips", "GE"), (20, 86),
               _protocols(_BASE_15T, T1w=Protocol("GRE", (9.6, 9.8), (4.6, 4.6), None, (8, 8)),
                          T2w=Protocol("SE", (5700, 8200), (100, 100)), PD=Protocol("SE", (5700, 8200), (8, 8))),
               clinical=(ClinicalAcquisition("PD", Geometry("coronal", 3.2, 0.94)),), wmh_probability=0.2),
    SitePreset("BCP", (3.0,), ("Siemens",), (0.1, 5.0),
               _protocols(_BASE_3T, T1w=Protocol("MPRAGE", (2400, 2400), (2.24, 2.24), (1600, 1600), (8, 8)))),
    SitePreset("ADNI", (3.0, 1.5), ("Siemens", "GE", "Philips"), (55, 90),
               _protocols(_BASE_3T, T1w=Protocol("MPRAGE", (2300, 2300), (2.98, 2.98), (900, 900), (9, 9)),
                          T2star=Protocol("GRE", (650, 650), (20, 20), None, (20, 20))),
               clinical=(ClinicalAcquisition("FLAIR", _AX5),), wmh_probability=0.6),
    SitePreset("AIBL", (3.0,), ("Siemens",), (60, 90),
               _protocols(_BASE_3T, T1w=Protocol("MPRAGE", (2300, 2300), (2.98, 2.98), (900, 900), (9, 9))),
               wmh_probability=0.6),
    SitePreset("BraTS2021", (1.5, 3.0), ("Siemens", "GE", "Philips"), (20, 80),
               _protocols(_BASE_3T, T1w=_SPIN_ECHO_T1),
               clinical=(ClinicalAcquisition("FLAIR", _AX5),
                         ClinicalAcquisition("T2w", Geometry("axial", 4.0, 0.9, 1.0))),
               tumour_probability=1.0),
    SitePreset("clinical", (1.5, 3.0), ("Siemens", "GE", "Philips", "Canon"), (20, 90),
               _protocols(_BASE_15T, T1w=_SPIN_ECHO_T1),
               clinical=(ClinicalAcquisition("FLAIR", _AX5), ClinicalAcquisition("PD", Geometry("coronal", 3.2, 0.9)),
                         ClinicalAcquisition("T1w", Geometry("sagittal", 4.0, 1.0, 0.4), _SPIN_ECHO_T1)),
               tumour_probability=0.2, wmh_probability=0.5),
    # Evaluation only: parameters outside every training range above (T2w TE, FLAIR TR/TE/TI, PD TE, MPRAGE TR), for
    # the zero-shot rows of the evaluation; never part of the training sites.
    SitePreset("unseen-params", (3.0,), ("Siemens",), (30, 70),
               _protocols(_BASE_3T, T1w=Protocol("MPRAGE", (2700, 2700), (3.0, 3.0), (1100, 1100), (9, 9)),
                          T2w=Protocol("SE", (7000, 9000), (150, 170)),
                          FLAIR=Protocol("IR", (12000, 12500), (150, 160), (2700, 2800)),
                          PD=Protocol("SE", (5000, 6000), (25, 30))),
               clinical=(ClinicalAcquisition("FLAIR", _AX5),)),
)}


def get_preset(name: str) -> SitePreset:
    if name not in PRESETS:
        raise ValueError(f"site preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


@dataclass(frozen=True)
class Subject:
    """Who was scanned where: the participants.tsv row plus the scanner and the pathology the anatomy carries."""

    participant_id: str
    site: str
    age: float
    sex: str
    field_strength: float
    manufacturer: str
    tumour: bool = False
    wmh: bool = False


def sample_subject(preset: SitePreset, participant_id: str, rng: np.random.Generator) -> Subject:
    age = prompt_round(rng.uniform(*preset.age_range))
    field_strength = float(preset.field_strengths[rng.integers(len(preset.field_strengths))])
    return Subject(participant_id, preset.name, age, str(rng.choice(["M", "F"])), field_strength,
                   str(preset.manufacturers[rng.integers(len(preset.manufacturers))]),
                   tumour=bool(rng.random() < preset.tumour_probability),
                   # WMH prevalence rises steeply after 60 (Wardlaw et al., Lancet Neurol 2013, 12:822-838).
                   wmh=bool(rng.random() < preset.wmh_probability * min(1.0, max(0.0, (age - 40.0) / 30.0))))


def site_protocol(preset: SitePreset, subject: Subject, modality: str) -> Protocol:
    """The protocol a subject gets: the site's, except that a 3 T site scanning at 1.5 T uses 1.5 T timings for
    the contrasts it does not fix itself."""
    if modality not in MODALITIES:
        raise ValueError(f"modality: expected one of {MODALITIES}, got {modality!r}")
    protocol = preset.protocols[modality]
    if subject.field_strength == 1.5 and protocol is _BASE_3T[modality]:
        return _BASE_15T[modality]
    return protocol
