"""Receptor status: the biology (true ER/PR/Her2) and what the clinical record says.

Shares follow TCGA-BRCA's Biotab table: ER about 75% positive, PR correlated with
ER, Her2 about 18% positive among evaluated cases with a large "Equivocal" share, and
a few "[Not Evaluated]"/"Indeterminate" records. Recorded values are the truth with
``label_noise`` of them flipped (IHC is not perfect).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POSITIVE, NEGATIVE = "Positive", "Negative"
EQUIVOCAL, INDETERMINATE = "Equivocal", "Indeterminate"
NOT_EVALUATED, NOT_AVAILABLE = "[Not Evaluated]", "[Not Available]"


@dataclass(frozen=True)
class TrueStatus:
    er: bool
    pr: bool
    her2: bool
    her2_borderline: bool  # reported "Equivocal" when it is


@dataclass(frozen=True)
class Recorded:
    ER: str
    PR: str
    Her2: str

    def as_dict(self) -> dict[str, str]:
        return {"ER": self.ER, "PR": self.PR, "Her2": self.Her2}


def draw_truth(rng: np.random.Generator) -> TrueStatus:
    er = rng.random() < 0.77
    pr = rng.random() < (0.83 if er else 0.12)
    her2 = rng.random() < (0.15 if er else 0.28)
    borderline = rng.random() < 0.19
    return TrueStatus(bool(er), bool(pr), bool(her2), bool(borderline))


def _record(value: bool, rng, noise: float, missing: float, indeterminate: float) -> str:
    r = rng.random()
    if r < missing:
        return NOT_EVALUATED
    if r < missing + indeterminate:
        return INDETERMINATE
    flipped = value != (rng.random() < noise)
    return POSITIVE if flipped else NEGATIVE


def record(
    truth: TrueStatus, rng: np.random.Generator, label_noise: float, complete: bool = False
) -> Recorded:
    """The clinical record of one patient; ``complete`` drops the missing values (external CSV)."""
    miss = 0.0 if complete else 1.0
    er = _record(truth.er, rng, label_noise, 0.045 * miss, 0.004 * miss)
    pr = _record(truth.pr, rng, label_noise, 0.045 * miss, 0.004 * miss)
    r = rng.random()
    if r < 0.15 * miss:
        her2 = NOT_EVALUATED
    elif r < 0.157 * miss:
        her2 = NOT_AVAILABLE
    elif truth.her2_borderline:
        her2 = EQUIVOCAL
    else:
        her2 = _record(truth.her2, rng, label_noise, 0.0, 0.011 * miss)
    return Recorded(er, pr, her2)


def prevalence(records: list[Recorded], marker: str) -> float | None:
    """Share of Positive among Positive/Negative records (None when there are none)."""
    values = [getattr(r, marker) for r in records]
    pos = sum(v == POSITIVE for v in values)
    neg = sum(v == NEGATIVE for v in values)
    return pos / (pos + neg) if pos + neg else None
