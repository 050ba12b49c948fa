"""The label-free default: tissue type from pixel features by documented thresholds.

Rules, in order (features from ``fpstore.tissue.features``, at ~1 um/px):

1. fat: white fraction between ``fat_white`` and ``fat_white_max``, split into vacuoles:
   crossed by thin membranes (``membrane_density`` >= ``fat_membrane``) or cut into at
   least ``fat_compartments`` white regions (thicker, unbroken membranes). Above
   ``fat_white_max`` the square is glass whatever thin lines cross it (a pen line, dust,
   a fold's edge: the real histolab no-tissue tiles), since fat keeps its membranes and a
   few cells in view;
2. background: white fraction >= ``background_white`` (more than half the square empty, the
   same cut as the truth masks and the extraction's ``min_tissue``) and not fat;
3. epithelium: dense nuclei, ``nuclear_fraction`` >= ``epithelium_nuclear``;
4. stroma: any other tissue (eosin-dominant, fibrous, sparse nuclei).

Probabilities: each rule's condition becomes a signed margin ``(value - threshold) / scale``
(positive when it holds; ``scale`` is the step that counts as clearly past the threshold);
an AND of conditions is the minimum of their margins, a NOT its negation. The class logits

    vacuoles   = max(membrane - fat_membrane, compartments - fat_compartments)
    fat        = min(white - fat_white, fat_white_max - white, vacuoles)
    background = min(white - background_white, -fat)
    epithelium = min(-max(fat, background), nuclear - epithelium_nuclear)
    stroma     = min(-max(fat, background), epithelium_nuclear - nuclear)

have their argmax equal to the rules above, and ``softmax(sharpness * logits)`` gives soft
probabilities in which the two classes a threshold separates tie exactly at the threshold
and the winner sharpens away from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fpstore.config import TISSUE_TYPES, check_range
from fpstore.tissue.features import FEATURE_NAMES


@dataclass(frozen=True)
class RuleThresholds:
    """Thresholds of the label-free rules (see the module docstring)."""

    background_white: float = 0.5
    fat_white: float = 0.4
    fat_white_max: float = 0.97
    fat_membrane: float = 0.008
    fat_compartments: float = 3.0
    epithelium_nuclear: float = 0.2
    sharpness: float = 2.0

    def __post_init__(self):
        for name in (
            "background_white",
            "fat_white",
            "fat_white_max",
            "fat_membrane",
            "epithelium_nuclear",
        ):
            check_range("RuleThresholds", name, getattr(self, name), 0.0, 1.0)
        check_range("RuleThresholds", "fat_compartments", self.fat_compartments, 1.0, 1000.0)
        check_range("RuleThresholds", "sharpness", self.sharpness, 1e-3, 1e3)

    def to_dict(self) -> dict:
        return asdict(self)


# The step past a threshold that counts as one unit of margin, per feature.
_SCALE = {"white": 0.1, "white_max": 0.01, "membrane": 0.002, "compartments": 1.0, "nuclear": 0.05}


def rule_logits(features: np.ndarray, thresholds: RuleThresholds = RuleThresholds()) -> np.ndarray:
    """Signed rule margins per class, (N, 4) in ``TISSUE_TYPES`` order."""
    f = {name: features[:, i] for i, name in enumerate(FEATURE_NAMES)}
    t = thresholds
    white = f["white_fraction"]
    fat = np.minimum.reduce(
        [
            (white - t.fat_white) / _SCALE["white"],
            (t.fat_white_max - white) / _SCALE["white_max"],
            np.maximum(
                (f["membrane_density"] - t.fat_membrane) / _SCALE["membrane"],
                # Half a region below the count ties: 3 regions pass a threshold of 3.
                (f["compartments"] - (t.fat_compartments - 0.5)) / _SCALE["compartments"],
            ),
        ]
    )
    background = np.minimum((white - t.background_white) / _SCALE["white"], -fat)
    tissue = -np.maximum(fat, background)
    nuclear = (f["nuclear_fraction"] - t.epithelium_nuclear) / _SCALE["nuclear"]
    epithelium = np.minimum(tissue, nuclear)
    stroma = np.minimum(tissue, -nuclear)
    by_type = {"background": background, "epithelium": epithelium, "stroma": stroma, "fat": fat}
    return np.stack([by_type[name] for name in TISSUE_TYPES], axis=1)


def rule_probabilities(
    features: np.ndarray, thresholds: RuleThresholds = RuleThresholds()
) -> np.ndarray:
    """Soft class probabilities (N, 4) in ``TISSUE_TYPES`` order; argmax = the rules."""
    logits = thresholds.sharpness * rule_logits(features, thresholds)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
