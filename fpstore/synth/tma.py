"""Tissue microarrays: a grid of circular cores, 1-2 per patient, cut in serial sections.

Following the paper's Table 1, an array is cut into serial sections stained at
different sites. A core samples its patient's tissue at a fixed place of the
block, so every section shows the same tissue; each section is placed on the glass
slightly shifted and rotated, warps a little and has its own cells, as consecutive
sections do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fpstore.synth.morphology import Morphology
from fpstore.synth.noise import seed_of
from fpstore.synth.scene import Region, Scene

SPACING = 1.25  # centre-to-centre distance / core diameter
BORDER = 0.5  # glass around the grid / core diameter


@dataclass(frozen=True)
class Spot:
    """One core position of the array (1-based row, column and core index)."""

    row: int
    column: int
    core_index: int
    patient_id: str
    offset: tuple[float, float]  # where in the patient's block the core was punched (um)


@dataclass(frozen=True)
class ArrayLayout:
    name: str
    spots: tuple[Spot, ...]
    rows: int
    columns: int
    core_um: float

    @property
    def size_um(self) -> tuple[float, float]:
        def extent(n):
            return (n - 1) * SPACING * self.core_um + self.core_um * (1 + 2 * BORDER)

        return extent(self.columns), extent(self.rows)


def layout_array(
    name: str, patient_ids: list[str], n_cores: int, core_um: float, rng: np.random.Generator
) -> ArrayLayout:
    """Place the cores: the first ``n_cores - len(patients)`` patients get two, side by side."""
    n_two = n_cores - len(patient_ids)
    columns = math.ceil(math.sqrt(n_cores))
    rows = math.ceil(n_cores / columns)
    spots = []
    for p, pid in enumerate(patient_ids):
        for k in range(2 if p < n_two else 1):
            i = len(spots)
            # Cores of one patient come from different places of the same tumour block.
            offset = (float(k * 4000.0 + rng.uniform(0, 800)), float(rng.uniform(0, 800)))
            spots.append(Spot(i // columns + 1, i % columns + 1, i + 1, pid, offset))
    return ArrayLayout(name, tuple(spots), rows, columns, core_um)


def section_scene(
    layout: ArrayLayout, morphs: dict[str, Morphology], section: int, seed: int, mpp: float = 0.25
) -> Scene:
    """One serial section of the array as a scene of core regions."""
    rng = np.random.default_rng(seed_of(seed, layout.name, "section", section))
    width_um, height_um = layout.size_um
    shift = rng.uniform(-40, 40, 2)
    tilt = np.radians(rng.uniform(-1.0, 1.0))
    cx, cy = width_um / 2, height_um / 2
    pitch = SPACING * layout.core_um
    first = layout.core_um * (0.5 + BORDER)
    radius = layout.core_um / 2
    regions, cores = [], []
    for spot in layout.spots:
        gx = first + (spot.column - 1) * pitch - cx
        gy = first + (spot.row - 1) * pitch - cy
        jitter = rng.uniform(-10, 10, 2)
        x = cx + np.cos(tilt) * gx - np.sin(tilt) * gy + shift[0] + jitter[0]
        y = cy + np.sin(tilt) * gx + np.cos(tilt) * gy + shift[1] + jitter[1]
        regions.append(
            Region(
                morph=morphs[spot.patient_id],
                bbox=(x - 1.1 * radius, y - 1.1 * radius, x + 1.1 * radius, y + 1.1 * radius),
                section_seed=seed_of(seed, layout.name, section, spot.core_index),
                centre=(float(x), float(y)),
                radius=radius,
                core=True,
                offset=spot.offset,
                angle=float(tilt + np.radians(rng.uniform(-2, 2))),
                outline_seed=seed_of(seed, layout.name, "core", spot.core_index),
            )
        )
        cores.append(
            {
                "row": spot.row,
                "column": spot.column,
                "core_index": spot.core_index,
                "patient_id": spot.patient_id,
                "x": round(x / mpp, 1),
                "y": round(y / mpp, 1),
                "diameter_px": round(layout.core_um / mpp, 1),
            }
        )
    width, height = int(round(width_um / mpp)), int(round(height_um / mpp))
    return Scene(
        width,
        height,
        regions,
        seed=seed_of(seed, layout.name, "cells", section),
        mpp=mpp,
        cores=cores,
    )
