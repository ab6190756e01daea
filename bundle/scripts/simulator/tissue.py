"""Tissue MR properties (T1, T2, T2*, proton density, susceptibility, gadolinium uptake) at 1.5 T and 3 T.

Every image of the simulator is a partial-volume sum over the tissue classes listed in ``TISSUES``; this module gives
each class its relaxation times for a field strength, a subject's age (myelination) and a small per-subject jitter.
Times in ms, PD relative to CSF = 1, susceptibility ``chi`` in ppm relative to CSF, gadolinium concentration ``gd``
in mmol/L reached on a contrast-enhanced scan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# Tissue classes, in the order the anatomy stores their partial-volume fractions.
TISSUES = ("WM", "cGM", "dGM", "CSF", "vessel", "WMH", "oedema", "enhancing", "necrosis")
FIELD_STRENGTHS = (1.5, 3.0)


@dataclass(frozen=True)
class TissueProperties:
    t1: float  # ms
    t2: float  # ms
    t2star: float  # ms
    pd: float  # relative to CSF
    chi: float = 0.0  # ppm relative to CSF (drives the SWI phase)
    gd: float = 0.0  # mmol/L gadolinium after injection (T1CE only)


# White and cortical grey matter T2: Stanisz et al., MRM 2005, 54:507-512 (WM 72/69 ms, GM 95/99 ms at 1.5/3 T).
# T1 at 3 T: Stanisz 2005 (WM 1084, GM 1820 ms); Wansapura et al., JMRI 1999, 9:531-538 report shorter values (WM 832,
# GM 1331) with a similar GM/WM ratio, which is what sets T1w contrast. T1 at 1.5 T: Rooney et al., MRM 2007,
# 57:308-318 (WM ~790, cortical GM ~1200 ms): Stanisz's 1.5 T pair (884/1124) has so small a ratio that, with GM's
# higher PD, a T1w spin echo would show GM as bright as WM, unlike real 1.5 T scans.
# T2*: Peters et al., MRI 2007, 25:748-753 (WM 66/53 ms, GM 84/66 ms at 1.5/3 T).
# PD (water content): Tofts (ed.), Quantitative MRI of the Brain, 2003: WM ~0.70, cortex ~0.80-0.84.
# CSF: T1 ~4000 ms at 1.5 T and 4163 ms at 3 T (Lu et al., JMRI 2005, 22:13-22); T2 of order 1500-2000 ms; T2* is
# limited by macroscopic field inhomogeneity (a modelling choice: a few hundred ms).
# Deep grey matter (caudate, putamen, thalamus, pallidum): T1 between WM and cortex, T2/T2* shortened by iron
# (Gelman et al., MRM 2001, 45:71-79; Lu 2005); susceptibility +0.05..0.15 ppm (Langkammer et al., NeuroImage
# 2012, 62:1593-1599); WM is slightly diamagnetic (myelin, about -0.03 ppm, same source).
# Venous blood: T1 1441/1624 ms at 1.5/3 T for haematocrit 0.42 (Lu et al., MRM 2004, 52:679-682); T2 ~100/50 ms at
# oxygenation ~0.6 (Zhao et al., MRM 2007, 58:592-597); deoxyhaemoglobin makes it paramagnetic, ~+0.45 ppm (SI)
# against tissue at oxygenation ~0.6 and haematocrit ~0.4 (Haacke et al., MRM 2004, 52:612-618); blood-pool
# gadolinium ~1 mM shortly after a 0.1 mmol/kg dose.
# Pathology (qualitative literature ordering, values modelled): white-matter hyperintensities and vasogenic oedema have
# more free water than WM (longer T1 and T2, higher PD: bright on T2w/FLAIR, dark on T1w; Wardlaw et al., Lancet Neurol
# 2013, 12:822-838); enhancing tumour takes up gadolinium through a broken blood-brain barrier (~0.3-0.5 mM); necrosis
# is nearly fluid (long T1/T2, no enhancement).
_ADULT = {
    1.5: {
        "WM": TissueProperties(790, 72, 66, 0.70, chi=-0.03),
        "cGM": TissueProperties(1200, 95, 84, 0.82),
        "dGM": TissueProperties(1000, 80, 55, 0.80, chi=0.08),
        "CSF": TissueProperties(4000, 2000, 400, 1.00),
        "vessel": TissueProperties(1441, 100, 35, 0.87, chi=0.45, gd=1.0),
        "WMH": TissueProperties(1150, 140, 110, 0.78, chi=-0.01),
        "oedema": TissueProperties(1300, 180, 140, 0.86),
        "enhancing": TissueProperties(1350, 120, 90, 0.84, gd=0.4),
        "necrosis": TissueProperties(2600, 400, 250, 0.95),
    },
    3.0: {
        "WM": TissueProperties(1084, 69, 53, 0.70, chi=-0.03),
        "cGM": TissueProperties(1820, 99, 66, 0.82),
        "dGM": TissueProperties(1450, 75, 40, 0.80, chi=0.08),
        "CSF": TissueProperties(4163, 1800, 300, 1.00),
        "vessel": TissueProperties(1624, 50, 20, 0.87, chi=0.45, gd=1.0),
        "WMH": TissueProperties(1450, 130, 90, 0.78, chi=-0.01),
        "oedema": TissueProperties(1700, 170, 110, 0.86),
        "enhancing": TissueProperties(1800, 110, 70, 0.84, gd=0.4),
        "necrosis": TissueProperties(3000, 380, 200, 0.95),
    },
}

# Newborn brain relative to adult: unmyelinated WM has far longer T1 and T2 and ~88% water, cortex is less affected,
# so neonatal T1w contrast is inverted (WM darker than GM) (Williams et al., Radiology 2005, 235:595-603; Dubois et
# al., Neuroscience 2014, 276:48-71). Approximate factors applied to the adult values above.
_NEWBORN_FACTOR = {"WM": (2.8, 2.8, 2.5, 0.88), "cGM": (1.35, 1.5, 1.4, 0.90), "dGM": (1.6, 1.8, 1.6, 0.88)}
# Myelination time constant (years): with it the WM/GM T1 contrast crosses over near 6 months and is adult-like by
# about 2 years, the course the paediatric literature describes (Dubois 2014).
MYELINATION_TAU_YEARS = 0.75


def myelination(age_years: float) -> float:
    """Fraction of adult myelination, 0 at birth rising to ~1 after two years."""
    return float(1.0 - np.exp(-max(age_years, 0.0) / MYELINATION_TAU_YEARS))


def _adult_table(field_strength: float) -> dict[str, TissueProperties]:
    if field_strength not in _ADULT:
        raise ValueError(f"field_strength: expected one of {FIELD_STRENGTHS} T, got {field_strength!r}")
    return _ADULT[field_strength]


def tissue_properties(field_strength: float, age_years: float = 40.0, rng: np.random.Generator | None = None,
                      jitter: float = 0.03) -> dict[str, TissueProperties]:
    """Properties of every class in ``TISSUES`` for one subject.

    ``rng`` adds a log-normal jitter of ``jitter`` (relative s.d.) to T1, T2 and T2* and half of it to PD, so no two
    subjects share exact relaxation times; ``rng=None`` gives the table values.
    """
    table = dict(_adult_table(field_strength))
    immature = 1.0 - myelination(age_years)
    for name, (f_t1, f_t2, f_t2s, pd_newborn) in _NEWBORN_FACTOR.items():
        adult = table[name]
        # Interpolate in log time: relaxation rates change smoothly and multiplicatively during maturation.
        table[name] = replace(adult, t1=adult.t1 * f_t1 ** immature, t2=adult.t2 * f_t2 ** immature,
                              t2star=adult.t2star * f_t2s ** immature,
                              pd=adult.pd + (pd_newborn - adult.pd) * immature)
    if rng is None:
        return table
    jittered = {}
    for name in TISSUES:
        p = table[name]
        scale = np.exp(rng.normal(0.0, jitter, size=3))
        jittered[name] = replace(p, t1=p.t1 * scale[0], t2=p.t2 * scale[1], t2star=p.t2star * scale[2],
                                 pd=min(1.0, p.pd * float(np.exp(rng.normal(0.0, jitter / 2)))))
    return jittered


# Gadolinium relaxivities (L mmol^-1 s^-1) of Gd-DTPA in plasma at 37 C: r1 4.1/3.7, r2 4.6/5.2 at 1.5/3 T
# (Rohrer et al., Invest Radiol 2005, 40:715-724).
_RELAXIVITY = {1.5: (4.1, 4.6), 3.0: (3.7, 5.2)}


def with_gadolinium(properties: dict[str, TissueProperties], field_strength: float) -> dict[str, TissueProperties]:
    """Relaxation after contrast injection: ``1/T = 1/T0 + r C`` per class (T2* shortened like T2)."""
    r1, r2 = _RELAXIVITY[field_strength]
    out = {}
    for name, p in properties.items():
        # r in L/(mmol s) times C in mmol/L is a rate in 1/s; /1000 converts to 1/ms.
        d1, d2 = r1 * p.gd / 1000.0, r2 * p.gd / 1000.0
        out[name] = replace(p, t1=1.0 / (1.0 / p.t1 + d1), t2=1.0 / (1.0 / p.t2 + d2),
                            t2star=1.0 / (1.0 / p.t2star + d2))
    return out
