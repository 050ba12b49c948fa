"""The paper's training loss.

    loss(img1, img2, y) = CE(img1, y) + CE(img2, y) + gamma * SE(L2n(fp1), L2n(fp2))

CE is the batch mean of the cross entropy; SE is the squared Euclidean distance between
the L2-normalised fingerprints, summed over the 512 dimensions and averaged over the batch
(so it lies in [0, 4] and gamma = 0.5 weighs it like one CE term near convergence).
Without a restyled copy (stain "none") the loss is CE(img1, y) alone.

With the cosine head (``fpstore.encoders.fingerprint_net.CosineHead``) the logits are cosines
and each CE is CosFace's (Wang et al. 2018): CE(scale * (cos - margin * onehot(y)), y). The
margin makes every core's crops cluster tighter than its neighbours' by an angle, which is what
nearest-neighbour matching of unseen cores needs; ``margin`` None means plain logits.

The set-level objective (``set_contrast``) adds to the paper's CE what the matching game
measures: the mean normalised fingerprint of a few crops from one region of a class must find
the mean from another region of the same class among the batch's classes (a symmetric InfoNCE
over region means, as prototypical networks train for classes never seen; Snell et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_GAMMA = 0.5


@dataclass
class LossParts:
    total: torch.Tensor
    ce1: torch.Tensor
    ce2: torch.Tensor | None = None
    se: torch.Tensor | None = None
    nce: torch.Tensor | None = None


def fingerprint_distance(fp1: torch.Tensor, fp2: torch.Tensor) -> torch.Tensor:
    """Batch mean of sum_d (L2n(fp1) - L2n(fp2))^2."""
    n1 = F.normalize(fp1.float(), dim=1)
    n2 = F.normalize(fp2.float(), dim=1)
    return (n1 - n2).pow(2).sum(dim=1).mean()


@dataclass(frozen=True)
class Margin:
    """CosFace's scale and additive cosine margin, for logits that are cosines."""

    scale: float = 16.0
    margin: float = 0.2

    def logits(self, cosines: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(y, cosines.shape[1]).to(cosines.dtype)
        return self.scale * (cosines - self.margin * onehot)


def _ce(
    logits: torch.Tensor, y: torch.Tensor, margin: Margin | None, smoothing: float = 0.0
) -> torch.Tensor:
    logits = logits.float()
    return F.cross_entropy(
        margin.logits(logits, y) if margin else logits, y, label_smoothing=smoothing
    )


def fingerprint_loss(
    logits1: torch.Tensor,
    y: torch.Tensor,
    logits2: torch.Tensor | None = None,
    fp1: torch.Tensor | None = None,
    fp2: torch.Tensor | None = None,
    gamma: float = DEFAULT_GAMMA,
    margin: Margin | None = None,
    smoothing: float = 0.0,
) -> LossParts:
    """CE(img1, y) [+ CE(img2, y) + gamma * SE(L2n(fp1), L2n(fp2)) when a pair is given];
    ``smoothing``: the CE terms' label smoothing."""
    ce1 = _ce(logits1, y, margin, smoothing)
    if logits2 is None:
        return LossParts(total=ce1, ce1=ce1)
    if fp1 is None or fp2 is None:
        raise ValueError("a pair loss needs both fingerprints fp1 and fp2")
    ce2 = _ce(logits2, y, margin, smoothing)
    se = fingerprint_distance(fp1, fp2)
    return LossParts(total=ce1 + ce2 + gamma * se, ce1=ce1, ce2=ce2, se=se)


def set_contrast(fp: torch.Tensor, crops: int, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between the two regions of each class.

    ``fp`` [classes * 2 * crops, D] in class-major order, [class][region][crop]
    (``fpstore.fingerprint.data.SetStream``); each region is the normalised mean of its crops'
    L2-normalised fingerprints, and region 0 of a class must pick region 1 of the same class
    among all classes' (and back) at ``temperature``."""
    z = F.normalize(fp.float(), dim=1)
    means = F.normalize(z.reshape(-1, 2, crops, z.shape[1]).mean(dim=2), dim=2)
    logits = means[:, 0] @ means[:, 1].T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def set_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    fp: torch.Tensor,
    crops: int,
    temperature: float,
    weight: float,
    smoothing: float = 0.0,
) -> LossParts:
    """CE(crops, y) + weight * set_contrast: the set-level objective."""
    ce = _ce(logits, y, None, smoothing)
    nce = set_contrast(fp, crops, temperature)
    return LossParts(total=ce + weight * nce, ce1=ce, nce=nce)
