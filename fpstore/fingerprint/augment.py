"""Batched augmentation on the training device: the paper's rotation and flips,
brightness/contrast, colour jitter and random grayscale.

Everything works on float NCHW batches in [0, 1] with per-sample random parameters drawn
from a torch.Generator, so a GPU never waits for per-image CPU work. The two images of a
style pair share one geometric transform (same morphology, same orientation) and get
independent colour jitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fpstore.config import check_range

_GRAY = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    dihedral: bool = True  # the 8 rotations by 90 degrees and flips (crops are square)
    brightness: float = 0.25  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.25
    saturation: float = 0.25
    hue: float = 0.04  # fraction of a full turn of the hue circle
    grayscale_p: float = 0.2

    def __post_init__(self):
        for name in ("brightness", "contrast", "saturation"):
            check_range("AugmentConfig", name, getattr(self, name), 0.0, 1.0)
        check_range("AugmentConfig", "hue", self.hue, 0.0, 0.5)
        check_range("AugmentConfig", "grayscale_p", self.grayscale_p, 0.0, 1.0)


def random_codes(n: int, generator: torch.Generator, device) -> torch.Tensor:
    """One dihedral code in 0..7 per sample (bit 2: flip, bits 0-1: quarter turns)."""
    return torch.randint(0, 8, (n,), generator=generator, device=device)


def dihedral(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Apply per-sample quarter turns and horizontal flips to square images [N, C, S, S]:
    code c flips when c & 4, then turns c & 3 quarters.

    On the CPU each code's samples are gathered and turned once. On other devices every
    turn of the whole batch is selected with ``torch.where`` instead, so that the device
    never reports back to the host (gathering needs the count of each code) in the step.
    """
    if x.device.type != "cpu":
        return _dihedral_where(x, codes)
    out = torch.empty_like(x)
    for code in codes.unique().tolist():
        rows = (codes == code).nonzero().flatten()
        part = x[rows].flip(-1) if code & 4 else x[rows]
        out[rows] = torch.rot90(part, code & 3, dims=(-2, -1))
    return out


def _dihedral_where(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    pick = codes.view(-1, 1, 1, 1)
    x = torch.where((pick & 4) > 0, x.flip(-1), x)
    turns = pick & 3
    out = torch.where(turns == 1, torch.rot90(x, 1, dims=(-2, -1)), x)
    out = torch.where(turns == 2, torch.rot90(x, 2, dims=(-2, -1)), out)
    return torch.where(turns == 3, torch.rot90(x, 3, dims=(-2, -1)), out)


def _uniform(n, spread, generator, device):
    return 1.0 + (torch.rand(n, generator=generator, device=device) * 2 - 1) * spread


def _hue_matrices(angles: torch.Tensor) -> torch.Tensor:
    """Rotations about the grey axis (1,1,1)/sqrt(3): hue shifts that keep luminance order."""
    c, s = torch.cos(angles), torch.sin(angles)
    k = 1.0 / 3.0
    r = math.sqrt(k)
    a = c + (1 - c) * k
    b = (1 - c) * k - r * s
    d = (1 - c) * k + r * s
    row0 = torch.stack([a, b, d], dim=1)
    row1 = torch.stack([d, a, b], dim=1)
    row2 = torch.stack([b, d, a], dim=1)
    return torch.stack([row0, row1, row2], dim=1)  # [N, 3, 3]


def photometric(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation, hue and random grayscale, per sample."""
    n, device = x.shape[0], x.device

    def gray(t):  # weights as Python floats: no tensor to upload in the step
        return (t[:, 0:1] * _GRAY[0]) + (t[:, 1:2] * _GRAY[1]) + (t[:, 2:3] * _GRAY[2])

    if cfg.brightness:
        x = x * _uniform(n, cfg.brightness, generator, device).view(n, 1, 1, 1)
    if cfg.contrast:
        mean = gray(x).mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * _uniform(n, cfg.contrast, generator, device).view(n, 1, 1, 1) + mean
    if cfg.saturation:
        g = gray(x)
        x = (x - g) * _uniform(n, cfg.saturation, generator, device).view(n, 1, 1, 1) + g
    if cfg.hue:
        angles = (torch.rand(n, generator=generator, device=device) * 2 - 1) * cfg.hue * 2 * math.pi
        x = torch.einsum("nij,njhw->nihw", _hue_matrices(angles).to(x.dtype), x)
    if cfg.grayscale_p:
        to_gray = torch.rand(n, generator=generator, device=device) < cfg.grayscale_p
        x = torch.where(to_gray.view(n, 1, 1, 1), gray(x).expand_as(x), x)
    return x.clamp_(0.0, 1.0)


def augment_pair(
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    cfg: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment a batch (and its restyled twin with the same geometry)."""
    if cfg.dihedral:
        codes = random_codes(x1.shape[0], generator, x1.device)
        x1 = dihedral(x1, codes)
        x2 = dihedral(x2, codes) if x2 is not None else None
    x1 = photometric(x1, cfg, generator)
    x2 = photometric(x2, cfg, generator) if x2 is not None else None
    return x1, x2
