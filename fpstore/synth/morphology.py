"""Latent morphology of a patient's tumour, and how receptor status shifts it.

Each patient draws its own parameters (nuclear size and pleomorphism, cellularity,
gland formation, stroma, fat and immune fractions, ...) so patients differ while
all sections of one patient share them. Status shifts them by ``effect`` (0 = none):
ER-negative tumours get larger, more pleomorphic, darker nuclei, fewer glands, more
solid sheets, lymphocytes and necrosis; Her2-positive ones get eosinophilic
cytoplasm and prominent nucleoli. All cues are visible at 0.5 um/px in 112 um squares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from fpstore.synth.labels import TrueStatus
from fpstore.synth.noise import noise_quantile


@dataclass(frozen=True)
class Morphology:
    seed: int  # keys the patient's tissue layout (same in every section)
    epithelium: float  # area fractions of tissue
    fat: float
    gland: float  # share of epithelium forming glands with lumens
    solid: float  # share of epithelium in solid sheets (rest: nests/cords)
    nucleus_um: float  # mean epithelial nuclear radius
    pleomorphism: float  # coefficient of variation of size and shape
    chromatin: float  # hematoxylin density of nuclei
    nucleoli: float  # probability of a visible nucleolus
    cellularity: float  # share of epithelial cell slots holding a nucleus
    cytoplasm: float  # eosin density of tumour cytoplasm
    stroma: float  # eosin density of collagen
    fibre_um: float  # length of collagen fibre texture
    immune: float  # lymphocyte density in stroma (0..1)
    necrosis: float  # share of solid areas that is necrotic
    structure_um: float  # size of the epithelium/stroma/fat layout
    gland_um: float  # gland radius
    adipocyte_um: float  # fat cell diameter

    def as_dict(self) -> dict:
        return asdict(self)

    # Level-set thresholds of the layout noise for the wanted area fractions.
    @cached_property
    def thresholds(self) -> dict[str, float]:
        rest = max(1e-3, 1 - self.epithelium)
        return {
            "epithelium": float(noise_quantile(1 - self.epithelium)),
            "fat": float(noise_quantile(1 - min(0.95, self.fat / rest))),
            "gland": float(noise_quantile(self.gland)),
            "solid": float(noise_quantile(1 - self.solid)),
            "necrosis": float(noise_quantile(1 - self.necrosis)),
        }


def draw_morphology(
    rng: np.random.Generator, status: TrueStatus, effect: float, seed: int
) -> Morphology:
    """A patient's morphology given the (true or decoy) status that shapes it."""
    er_neg = effect * (0.0 if status.er else 1.0)
    her2 = effect * (1.0 if status.her2 else 0.0)
    u = rng.uniform
    clip = np.clip
    return Morphology(
        seed=seed,
        epithelium=float(clip(u(0.25, 0.5) + 0.08 * er_neg, 0.15, 0.7)),
        fat=float(u(0.05, 0.35)),
        gland=float(clip(u(0.2, 0.7) - 0.3 * er_neg, 0.0, 0.9)),
        solid=float(clip(u(0.05, 0.3) + 0.35 * er_neg, 0.0, 0.9)),
        nucleus_um=float(clip(u(3.2, 4.2) + 0.9 * er_neg + 0.45 * her2, 2.8, 6.5)),
        pleomorphism=float(clip(u(0.06, 0.2) + 0.12 * er_neg, 0.03, 0.45)),
        chromatin=float(clip(u(0.9, 1.25) + 0.2 * er_neg, 0.6, 1.8)),
        nucleoli=float(clip(u(0.0, 0.25) + 0.5 * her2, 0.0, 0.95)),
        cellularity=float(clip(u(0.55, 0.85) + 0.1 * er_neg, 0.3, 0.98)),
        cytoplasm=float(clip(u(0.25, 0.45) + 0.25 * her2, 0.1, 0.9)),
        stroma=float(u(0.45, 0.85)),
        fibre_um=float(u(6.0, 16.0)),
        immune=float(clip(u(0.02, 0.25) + 0.3 * er_neg, 0.0, 0.9)),
        necrosis=float(clip(u(0.0, 0.08) + 0.3 * er_neg, 0.0, 0.8)),
        structure_um=float(u(180.0, 420.0)),
        gland_um=float(u(22.0, 45.0)),
        adipocyte_um=float(u(55.0, 95.0)),
    )
