"""The label-free default: tissue type from pixel features read in H&E terms.

The features (``fpstore.tissue.features``, at ~1 um/px, against the slide's own stains)
split each patch's area into glass, epithelium, stroma and fat. The rules then read the
patch as a pathologist reads a truth mask:

1. background: glass covers more than ``background_white`` of the square (more than half:
   the same cut as the truth masks and the extraction's ``min_tissue``), or the square is
   more than ``fat_white_max`` white whatever thin lines cross it (a pen line or a fold's
   edge on glass: the real histolab no-tissue tiles; fat keeps membranes and cells in view);
2. otherwise the tissue type covering the most of the square, epithelium needing
   ``epithelium_margin`` more than the next (0: a plain majority).

Nothing here is tuned per site: what moves with the stain (how dark nuclei are, how much
hematoxylin cytoplasm takes up) is measured on each slide by ``estimate_slide_stains``.

Probabilities: each condition becomes a signed margin ``(value - threshold) / scale``
(positive when it holds; ``scale``: the step that counts as clearly past it); the logits

    background = max((glass - background_white) / s, (white - fat_white_max) / s_max)
    tissue t   = min(-background, (share_t - bias_t - max over other tissue u of share_u) / s)

have their argmax equal to the rules above, and ``softmax(sharpness * logits)`` gives soft
probabilities in which the two classes a threshold separates tie exactly at the threshold.
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
    fat_white_max: float = 0.97
    epithelium_margin: float = 0.0
    sharpness: float = 10.0

    def __post_init__(self):
        check_range("RuleThresholds", "background_white", self.background_white, 0.0, 1.0)
        check_range("RuleThresholds", "fat_white_max", self.fat_white_max, 0.0, 1.0)
        check_range("RuleThresholds", "epithelium_margin", self.epithelium_margin, -1.0, 1.0)
        check_range("RuleThresholds", "sharpness", self.sharpness, 1e-3, 1e3)

    def to_dict(self) -> dict:
        return asdict(self)


_SCALE = 0.1  # a tenth of the square past a threshold is one unit of margin
_SCALE_MAX = 0.01  # the near-empty cut is a narrow one
_SHARES = {"epithelium": "epithelium_share", "stroma": "stroma_share", "fat": "fat_share"}


def rule_logits(features: np.ndarray, thresholds: RuleThresholds = RuleThresholds()) -> np.ndarray:
    """Signed rule margins per class, (N, 4) in ``TISSUE_TYPES`` order."""
    column = {name: i for i, name in enumerate(FEATURE_NAMES)}
    background = np.maximum(
        (features[:, column["glass_share"]] - thresholds.background_white) / _SCALE,
        (features[:, column["white_fraction"]] - thresholds.fat_white_max) / _SCALE_MAX,
    )
    shares = {kind: features[:, column[name]].astype(np.float64) for kind, name in _SHARES.items()}
    shares["epithelium"] = shares["epithelium"] - thresholds.epithelium_margin
    by_type = {"background": background}
    for kind, share in shares.items():
        best_other = np.maximum.reduce([v for k, v in shares.items() if k != kind])
        by_type[kind] = np.minimum(-background, (share - best_other) / _SCALE)
    return np.stack([by_type[name] for name in TISSUE_TYPES], axis=1)


def rule_probabilities(
    features: np.ndarray, thresholds: RuleThresholds = RuleThresholds()
) -> np.ndarray:
    """Soft class probabilities (N, 4) in ``TISSUE_TYPES`` order; argmax = the rules."""
    logits = thresholds.sharpness * rule_logits(features, thresholds)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
