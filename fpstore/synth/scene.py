"""What lies where on a slide: regions of patient tissue and their structure fields.

A slide is a set of regions (one tissue piece for a whole-slide image, one disk per
TMA core). Each region maps slide microns to its patient's own tissue coordinates,
where the layout (epithelium/stroma/fat, glands, adipocytes, immune infiltrates,
necrosis, fibre direction) is a pure function of the patient seed: two sections of
the same patient, or two cores from the same block, show the same tissue; a
section adds a small warp and a little section-specific noise, as serial sections do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fpstore.synth.morphology import Morphology
from fpstore.synth.noise import fbm_many, nearest_two, value_noise

# Structure channels ("margins": > 0 means inside). Smooth ones are evaluated on an
# 8 um grid, cell-scale ones (glands, adipocytes) on a 2 um grid; both are upsampled.
SMOOTH = (
    "outline",
    "epi",
    "fat",
    "gland",
    "solid",
    "lymph",
    "necrosis",
    "cos2",
    "sin2",
    "thickness",
)
CELLS = ("gdist", "lumen", "membrane")


@dataclass(frozen=True)
class Region:
    """Patient tissue on a slide: a whole-slide piece or a TMA core (slide microns)."""

    morph: Morphology
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1
    section_seed: int  # differs between serial sections
    centre: tuple[float, float]
    radius: float  # core radius; for a whole-slide piece, the half-diagonal of its box
    core: bool
    offset: tuple[float, float] = (0.0, 0.0)  # where the region sits in patient space
    angle: float = 0.0  # radians, section placement on the glass
    outline_seed: int = 0
    warp_um: float = 4.0

    def to_patient(self, x: np.ndarray, y: np.ndarray):
        """Slide microns to patient tissue microns: placement, rotation and a small warp."""
        dx = x - self.centre[0]
        dy = y - self.centre[1]
        c, s = np.cos(self.angle), np.sin(self.angle)
        u = c * dx - s * dy + self.offset[0]
        v = s * dx + c * dy + self.offset[1]
        if self.warp_um:
            wu, wv = fbm_many(
                u, v, [(250.0, self.section_seed + 11, 1), (250.0, self.section_seed + 12, 1)]
            )
            u = u + 0.5 * self.warp_um * wu
            v = v + 0.5 * self.warp_um * wv
        return u, v

    def outline_specs(self) -> list[tuple[float, int, int]]:
        """Noise layers of the outline, evaluated at slide microns (see outline())."""
        if self.core:
            return [(60.0, self.outline_seed, 2)]
        return [(0.35 * self.radius, self.outline_seed, 3), (90.0, self.outline_seed + 1, 2)]

    def outline(self, x: np.ndarray, y: np.ndarray, noise: list[np.ndarray]) -> np.ndarray:
        """> 0 on tissue: a disk with a ragged rim (core) or an irregular piece (slide)."""
        if self.core:
            r = np.hypot((x - self.centre[0]), (y - self.centre[1])) / self.radius
            return (1 - r + 0.06 * noise[0]) * 8
        # Whole-slide piece: an elliptic blob with lobes and holes, bounded by the box.
        x0, y0, x1, y1 = self.bbox
        rx = (x - self.centre[0]) / ((x1 - x0) / 2)
        ry = (y - self.centre[1]) / ((y1 - y0) / 2)
        blob = 1 - np.hypot(rx, ry) ** 2 * 1.1
        holes = np.minimum(0, 1.5 * noise[1] + 2.2)
        edge = np.minimum(np.minimum(rx + 0.97, 0.97 - rx), np.minimum(ry + 0.97, 0.97 - ry))
        return np.minimum((blob + 0.55 * noise[0]) * 3 + holes, edge * 40)


def smooth_fields(region: Region, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SMOOTH channels at slide microns x, y -> float32 [..., len(SMOOTH)]."""
    m = region.morph
    t = m.thresholds
    seed, sect = m.seed, region.section_seed
    u, v = region.to_patient(x, y)
    specs = region.outline_specs()
    n_out = len(specs)
    # one batch for all layers (coordinates differ: slide for outline/thickness, patient else)
    glass = fbm_many(x, y, specs + [(400.0, sect + 31, 2)])
    epi, epi_sect, fat, arch, lymph, necro, theta = fbm_many(
        u,
        v,
        [
            (m.structure_um, seed + 1, 3),
            (60.0, sect + 21, 2),
            (1.3 * m.structure_um, seed + 2, 3),
            (0.8 * m.structure_um, seed + 3, 2),
            (140.0, seed + 7, 2),
            (0.45 * m.structure_um, seed + 8, 2),
            (160.0, seed + 9, 1),
        ],
    )
    theta = np.pi * 0.43 * theta
    fields = (
        region.outline(x, y, glass[:n_out]),
        epi + 0.12 * epi_sect - t["epithelium"],
        fat - t["fat"],
        t["gland"] - arch,
        arch - t["solid"],
        m.immune * np.clip(0.6 + 0.9 * lymph, 0, 2.5),
        necro - t["necrosis"],
        np.cos(2 * theta),
        np.sin(2 * theta),
        1 + 0.07 * glass[n_out],  # uneven section thickness / staining across the glass
    )
    return np.stack(fields, axis=-1).astype(np.float32)


def gland_fields(region: Region, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gland distance (1 at the gland's rim) and lumen margin -> float32 [..., 2]."""
    m = region.morph
    u, v = region.to_patient(x, y)
    d1, _, gid = nearest_two(u, v, 2.6 * m.gland_um, m.seed + 4)
    radius = m.gland_um * (0.75 + 0.5 * gid)
    gdist = d1 / radius + 0.18 * value_noise(u, v, 0.6 * m.gland_um, m.seed + 5)
    return np.stack((gdist, (0.3 + 0.3 * gid) - gdist), axis=-1).astype(np.float32)


def fat_fields(region: Region, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance to the nearest adipocyte membrane proxy (d2 - d1, um) -> float32 [..., 1]."""
    u, v = region.to_patient(x, y)
    f1, f2, _ = nearest_two(u, v, region.morph.adipocyte_um, region.morph.seed + 6, jitter=0.7)
    return (f2 - f1)[..., None].astype(np.float32)


# Values of CELLS where a field is not needed (far from any gland or membrane).
CELLS_FAR = (9.0, -9.0, 99.0)


@dataclass
class Scene:
    """A slide to render: size in level-0 pixels, its regions, and its identity."""

    width: int
    height: int
    regions: list[Region]
    seed: int  # per-slide seed for cell-scale noise (nuclei, fibres, sensor)
    mpp: float = 0.25  # level 0
    cores: list[dict] = field(default_factory=list)  # TMA: row, column, core_index, ...

    def regions_in(self, x0: float, y0: float, x1: float, y1: float) -> list[tuple[int, Region]]:
        """Regions whose box meets the rectangle (slide microns)."""
        found = []
        for i, r in enumerate(self.regions):
            bx0, by0, bx1, by1 = r.bbox
            if not (bx0 < x1 and bx1 > x0 and by0 < y1 and by1 > y0):
                continue
            if r.core:  # the disk (with its ragged rim) must reach the rectangle
                dx = max(x0 - r.centre[0], 0, r.centre[0] - x1)
                dy = max(y0 - r.centre[1], 0, r.centre[1] - y1)
                if math.hypot(dx, dy) > 1.08 * r.radius:
                    continue
            found.append((i, r))
        return found
