"""Patch grids and sampling.

A grid is the paper's tiling: non-overlapping squares of ``patch_um`` microns
(``size_px`` level-0 pixels), from the slide's top-left corner, wholly inside the
slide, kept where the tissue fraction is at least ``PatchSpec.min_tissue``.
Coordinates are level-0 pixels (top-left corner); a square's pixels are read
with ``Slide.read_patches`` and resized to ``out_px``.

Sampling is the paper's "120 random patches per patient": pooled over the
patient's slides, drawn without replacement from a generator seeded by
(seed, patient id), so a patient's sample does not change when other patients
are added to or removed from the cohort.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from fpstore.config import PatchSpec
from fpstore.errors import ConfigError

GRID_SCHEMA = pa.schema(
    [
        pa.field("x", pa.int64(), nullable=False),
        pa.field("y", pa.int64(), nullable=False),
        pa.field("size_px", pa.float32(), nullable=False),
        pa.field("tissue_fraction", pa.float32(), nullable=False),
    ]
)
PAPER_PATCHES_PER_PATIENT = 120
GRID_BAND = 1 << 20  # squares scored at a time


def grid_squares(width: int, height: int, size_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (x, y) of the non-overlapping squares wholly inside the slide.

    Corners are rounded from multiples of the (fractional) side, so squares tile
    the slide without drift; neighbours may share a pixel row, never more.
    """
    cols, rows = int(width // size_px), int(height // size_px)
    xs = np.round(np.arange(cols) * size_px).astype(np.int64)
    ys = np.round(np.arange(rows) * size_px).astype(np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return grid_x.ravel(), grid_y.ravel()


def patch_grid(slide, spec: PatchSpec = PatchSpec(), mask=None) -> pa.Table:
    """The tissue squares of a slide: columns x, y, size_px, tissue_fraction (row-major).

    ``mask`` is a ``TissueMask``; by default it is computed with ``tissue_mask``.
    """
    if mask is None:
        from fpstore.slides.tissue_mask import tissue_mask

        mask = tissue_mask(slide)
    size_px = slide.patch_size_px(spec.patch_um)
    xs, ys = grid_squares(slide.info.width, slide.info.height, size_px)
    kept = {"x": [], "y": [], "tissue_fraction": []}
    # Band by band: memory follows the tissue squares kept, not the slide's whole grid.
    for start in range(0, len(xs), GRID_BAND):
        x, y = xs[start : start + GRID_BAND], ys[start : start + GRID_BAND]
        fraction = mask.fraction_in(x, y, size_px)
        # A hair of tolerance: an all-tissue square computes to 0.9999999 in floating point.
        keep = fraction >= spec.min_tissue - 1e-6
        kept["x"].append(x[keep])
        kept["y"].append(y[keep])
        kept["tissue_fraction"].append(fraction[keep].astype(np.float32))
    columns = {k: np.concatenate(v) if v else np.zeros(0) for k, v in kept.items()}
    return pa.table(
        {
            "x": columns["x"].astype(np.int64),
            "y": columns["y"].astype(np.int64),
            "size_px": np.full(len(columns["x"]), size_px, np.float32),
            "tissue_fraction": columns["tissue_fraction"].astype(np.float32),
        },
        schema=GRID_SCHEMA,
    )


def no_patch_reason(slide, spec: PatchSpec, mask) -> str:
    """One line saying why a slide's grid is empty, with its tissue fraction and the fix:
    a slide smaller than one square, or no square with ``min_tissue`` (a fluorescence scan,
    a blank, a --min-tissue above what the tissue fills)."""
    size_px = slide.patch_size_px(spec.patch_um)
    width, height = slide.info.width, slide.info.height
    if min(width, height) < size_px:
        return (
            f"the slide ({width}x{height} px at {slide.info.mpp:.4g} um/px) is smaller than one "
            f"{spec.patch_um:g}-um square ({size_px:.0f} px): check its mpp, or leave it out"
        )
    fraction = mask.fraction
    shown = f"{100 * fraction:.1f}%" if fraction == 0 or fraction >= 0.0005 else "<0.1%"
    fix = (
        f"lower --min-tissue (now {spec.min_tissue:g}) or leave the slide out"
        if fraction > 0
        else f"a lower --min-tissue (now {spec.min_tissue:g}) finds none; leave the slide out"
    )
    return (
        f"no tissue found (tissue fraction {shown} of the slide, no {spec.patch_um:g}-um "
        f"square with >= {100 * spec.min_tissue:g}% tissue): a fluorescence scan or a blank? {fix}"
    )


def _patient_seed(seed: int, patient_id: str) -> list[int]:
    """A seed for one patient that does not depend on the other patients (nor on PYTHONHASHSEED)."""
    digest = hashlib.sha256(patient_id.encode()).digest()
    return [int(seed), int.from_bytes(digest[:8], "little")]


def sample_rows(total: int, n: int, seed: int, patient_id: str) -> np.ndarray:
    """Sorted indices of the ``n`` of a patient's ``total`` patches that sampling keeps (all
    of them when ``total <= n``); the one draw extraction and ``classify --patches`` share."""
    rng = np.random.default_rng(_patient_seed(seed, patient_id))
    return np.sort(rng.choice(total, size=min(n, total), replace=False))


def sample_patches(
    grids: dict[str, pa.Table],
    n: int | None = PAPER_PATCHES_PER_PATIENT,
    seed: int = 0,
    patients: dict[str, str] | None = None,
) -> dict[str, pa.Table]:
    """``n`` random patches per patient, pooled over the patient's slides (None: all).

    ``grids`` maps slide_id to a grid table; ``patients`` maps slide_id to
    patient_id (default: every slide is its own patient). A patient with fewer
    than ``n`` patches keeps them all. Each returned table keeps its grid's row
    order, so patches are read in raster order.
    """
    if n is not None and n < 1:
        raise ConfigError(f"patches per patient n={n!r}; give a positive number, or None for all")
    if n is None:
        return dict(grids)
    patients = patients or {}
    missing = [s for s in grids if patients and s not in patients]
    if missing:
        raise ConfigError(f"slides without a patient in the mapping: {', '.join(sorted(missing))}")
    by_patient: dict[str, list[str]] = {}
    for slide_id in sorted(grids):
        by_patient.setdefault(patients.get(slide_id, slide_id), []).append(slide_id)
    sampled = {}
    for patient_id, slide_ids in by_patient.items():
        counts = [grids[s].num_rows for s in slide_ids]
        total = sum(counts)
        chosen = sample_rows(total, n, seed, patient_id)
        starts = np.cumsum([0] + counts)
        for slide_id, start, stop in zip(slide_ids, starts[:-1], starts[1:]):
            rows = chosen[(chosen >= start) & (chosen < stop)] - start
            sampled[slide_id] = grids[slide_id].take(pa.array(rows, pa.int64()))
    return {slide_id: sampled[slide_id] for slide_id in grids}
