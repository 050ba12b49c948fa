"""Staining/scanning sites and the Beer-Lambert law that turns stain densities into RGB.

Optical density is the sum of stain vector x concentration (hematoxylin, eosin),
transmitted light is I0 * exp(-OD): so a site's stain vectors and strengths change
colours the way real protocols do, and Macenko/Vahadane deconvolution recovers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from fpstore.errors import unknown_name


def _unit(v) -> tuple[float, float, float]:
    a = np.asarray(v, float)
    return tuple(float(x) for x in a / np.linalg.norm(a))


@dataclass(frozen=True)
class Site:
    """One laboratory + scanner: stain vectors and strengths, light, optics, compression."""

    name: str
    hematoxylin: tuple[float, float, float]  # OD per unit concentration, R G B (unit norm)
    eosin: tuple[float, float, float]
    h_gain: float = 1.0  # staining strength multipliers
    e_gain: float = 1.0
    light: tuple[float, float, float] = (242.0, 240.0, 244.0)  # I0: the empty-glass colour
    blur_um: float = 0.35  # optical point-spread sigma
    noise: float = 1.5  # sensor noise, grey levels
    jpeg_quality: int = 80
    scanner: str = "Aperio"

    def __post_init__(self):
        object.__setattr__(self, "hematoxylin", _unit(self.hematoxylin))
        object.__setattr__(self, "eosin", _unit(self.eosin))

    def to_rgb(self, h: np.ndarray, e: np.ndarray) -> np.ndarray:
        """Stain concentration maps (float32, H x W) to an RGB float32 image in [0, 255]."""
        # -OD per channel = -(h * H + e * E), as one 2->3 channel matrix product, then exp.
        m = -np.stack(
            (
                np.float32(self.h_gain) * np.asarray(self.hematoxylin, np.float32),
                np.float32(self.e_gain) * np.asarray(self.eosin, np.float32),
            ),
            axis=1,
        )
        neg_od = cv2.transform(cv2.merge((h.astype(np.float32), e.astype(np.float32))), m)
        rgb = cv2.exp(neg_od)
        rgb *= np.asarray(self.light, np.float32)
        return rgb

    def optics(self, rgb: np.ndarray, mpp: float, noise: np.ndarray) -> np.ndarray:
        """Scanner blur and sensor noise, then 8-bit."""
        sigma = self.blur_um / mpp
        if sigma > 0.05:
            rgb = cv2.GaussianBlur(rgb, (0, 0), sigma)
        rgb = rgb + np.float32(self.noise) * noise[..., None]
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "hematoxylin": self.hematoxylin,
            "eosin": self.eosin,
            "h_gain": self.h_gain,
            "e_gain": self.e_gain,
            "light": self.light,
            "blur_um": self.blur_um,
            "jpeg_quality": self.jpeg_quality,
            "scanner": self.scanner,
        }


# Macenko's reference H&E vectors, then per-site drifts of hue, strength and optics.
_H = np.array((0.5626, 0.7201, 0.4062))
_E = np.array((0.2159, 0.8012, 0.5581))


def _drift(v, d) -> tuple[float, float, float]:
    return _unit(np.asarray(v) + np.asarray(d))


SITES: dict[str, Site] = {
    s.name: s
    for s in (
        # tcga-like tissue source sites (TSS codes)
        Site(
            "A2",
            _drift(_H, (0, 0, 0)),
            _drift(_E, (0, 0, 0)),
            1.0,
            1.0,
            (243, 241, 245),
            0.35,
            1.5,
            80,
        ),
        Site(
            "BH",
            _drift(_H, (-0.06, 0.04, 0.05)),
            _drift(_E, (0.08, 0.0, -0.12)),
            1.15,
            0.85,
            (238, 236, 242),
            0.45,
            2.0,
            75,
        ),
        Site(
            "E2",
            _drift(_H, (0.08, -0.03, -0.06)),
            _drift(_E, (-0.06, 0.05, 0.08)),
            0.85,
            1.25,
            (246, 242, 240),
            0.30,
            1.2,
            85,
        ),
        Site(
            "AR",
            _drift(_H, (-0.1, 0.02, 0.12)),
            _drift(_E, (0.1, -0.08, 0.05)),
            1.05,
            0.95,
            (240, 240, 240),
            0.55,
            2.0,
            70,
        ),
        Site(
            "A8",
            _drift(_H, (0.04, 0.06, -0.1)),
            _drift(_E, (-0.1, -0.04, 0.06)),
            0.9,
            1.05,
            (242, 238, 243),
            0.40,
            1.6,
            82,
        ),
        Site(
            "D8",
            _drift(_H, (-0.08, -0.05, 0.02)),
            _drift(_E, (0.05, 0.08, -0.06)),
            1.1,
            1.2,
            (237, 241, 239),
            0.50,
            1.4,
            76,
        ),
        # external cohort sites
        Site(
            "X1",
            _drift(_H, (0.1, -0.06, -0.1)),
            _drift(_E, (0.02, 0.06, -0.15)),
            1.25,
            0.75,
            (236, 238, 244),
            0.40,
            1.8,
            78,
            "Hamamatsu",
        ),
        Site(
            "X2",
            _drift(_H, (-0.05, -0.02, 0.15)),
            _drift(_E, (-0.08, 0.02, 0.1)),
            0.80,
            1.15,
            (248, 244, 246),
            0.30,
            1.0,
            90,
            "Leica",
        ),
        # TMA sites of the paper's Table 1: A = array supplier (Aperio, softer), B = our lab (Zeiss)
        Site(
            "A",
            _drift(_H, (0.0, 0.05, -0.05)),
            _drift(_E, (0.12, -0.05, -0.1)),
            0.95,
            1.1,
            (244, 240, 238),
            0.55,
            2.0,
            72,
        ),
        Site(
            "B",
            _drift(_H, (0.05, -0.05, 0.06)),
            _drift(_E, (-0.05, 0.06, 0.02)),
            1.15,
            0.9,
            (239, 240, 246),
            0.30,
            1.2,
            88,
            "Zeiss",
        ),
    )
}


def get_site(name: str) -> Site:
    if name not in SITES:
        raise unknown_name("site", name, SITES)
    return SITES[name]
