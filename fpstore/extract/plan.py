"""Planning a run: which patches of which slides, and the settings that make files comparable.

plan     open each pending slide, tissue mask, patch grid, sample n patches per patient
         (pooled over the patient's slides)
resume   the settings a stored file must carry to count as done (``resume_key``)
int8     the calibration patches, spread evenly over the cohort (their digest joins the key)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from fpstore.config import PatchSpec
from fpstore.errors import FpstoreError, SlideError
from fpstore.extract.config import ExtractConfig
from fpstore.slides.tissue_mask import TissueMaskSpec
from fpstore.store.cohorts import CohortSlide
from fpstore.store.schema import SCHEMA_VERSION

# int8: activation ranges come from this many tissue patches of the cohort (half of them
# check the agreement with fp32), taken from up to CALIBRATION_SLIDES slides.
CALIBRATION_PATCHES, CALIBRATION_SLIDES = 64, 8


@dataclass
class SlidePlan:
    slide: CohortSlide
    mpp: float
    size_px: float
    keys: pa.Table  # x, y, tissue_fraction of the sampled patches

    @property
    def slide_id(self) -> str:
        return self.slide.slide_id


def _grid(slide: CohortSlide, spec: PatchSpec):
    """(slide info, grid table) of one cohort slide; raises FpstoreError on a bad slide,
    and on one without a single tissue square (a blank, a fluorescence scan)."""
    from fpstore.cohort.cohorts import open_cohort_slide
    from fpstore.slides.grid import no_patch_reason, patch_grid
    from fpstore.slides.tissue_mask import tissue_mask

    with open_cohort_slide(slide) as opened:
        mask = tissue_mask(opened)
        grid = patch_grid(opened, spec, mask)
        if not len(grid):
            raise SlideError(no_patch_reason(opened, spec, mask))
        return opened.info, grid


def grid_or_error(slide: CohortSlide, spec: PatchSpec):
    """(slide info, grid, "") of one cohort slide, or (None, None, the error) for a bad one."""
    try:
        return (*_grid(slide, spec), "")
    except FpstoreError as error:
        return None, None, str(error)


def plan_slides(
    slides: list[CohortSlide],
    spec: PatchSpec,
    n: int | None,
    seed: int,
    failed: dict[str, str],
    progress: bool = True,
    map_fn=map,
) -> dict[str, SlidePlan]:
    """Tissue patches of each slide, n sampled per patient (pooled over its slides).

    ``map_fn(grid_or_error, slides, specs)`` yields one grid per slide in order: the builtin
    map on the local engine, Ray tasks on the Ray engine.
    """
    from tqdm import tqdm

    from fpstore.slides.grid import sample_patches

    infos, grids = {}, {}
    mapped = map_fn(grid_or_error, slides, [spec] * len(slides))
    for slide, (info, grid, error) in tqdm(
        zip(slides, mapped),
        total=len(slides),
        desc="planning",
        unit="slide",
        disable=not progress,
        leave=False,
    ):
        if error:
            failed[slide.slide_id] = error
        else:
            infos[slide.slide_id], grids[slide.slide_id] = info, grid
    patients = {s.slide_id: s.patient_id for s in slides}
    sampled = sample_patches(grids, n, seed, patients=patients)
    by_id = {s.slide_id: s for s in slides}
    plans = {}
    for slide_id, table in sampled.items():
        info = infos[slide_id]
        size = float(table.column("size_px")[0].as_py()) if len(table) else spec.patch_um / info.mpp
        plans[slide_id] = SlidePlan(by_id[slide_id], info.mpp, size, table)
    return plans


def resume_key(encoder, config: ExtractConfig) -> dict[str, str]:
    """The file metadata that must match for a stored slide to count as done (int8 runs add
    their calibration digest)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "encoder": encoder.id,
        "encoder_hash": encoder.hash,
        "dim": str(encoder.dim),
        "patches": "all" if config.patches is None else str(config.patches),
        "seed": str(config.seed),
        "min_tissue": str(config.min_tissue),
        "precision": config.precision,
        "tissue_mask": TissueMaskSpec().digest,
        "stain_norm": encoder.stain_norm_key,
    }


def calibration_set(slides: list[CohortSlide], spec: PatchSpec) -> tuple[list, str]:
    """The int8 calibration patches of a cohort: [(slide, grid rows)], and their digest.

    Evenly spread over the cohort's slides in slide_id order and over each slide's tissue
    squares, so that a resumed run (or another process) calibrates on the same patches and
    gets the same quantized model. The digest joins the resume key: a cohort that gained
    slides calibrates differently, and its stored int8 files are then refused, not mixed.
    """

    def spread(n: int, k: int) -> np.ndarray:  # k indices evenly over range(n)
        return (
            np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))
            if n
            else np.zeros(0, int)
        )

    usable = sorted((s for s in slides if s.patient_id is not None), key=lambda s: s.slide_id)
    picked = [usable[i] for i in spread(len(usable), CALIBRATION_SLIDES)]
    per_slide = -(-CALIBRATION_PATCHES // max(1, len(picked)))
    chosen, ids = [], []
    for slide in picked:
        _, grid, error = grid_or_error(slide, spec)
        if error or not len(grid):
            continue
        sub = grid.take(spread(len(grid), per_slide))
        chosen.append((slide, sub))
        ids += [
            f"{slide.slide_id}:{x}:{y}"
            for x, y in zip(sub.column("x").to_pylist(), sub.column("y").to_pylist())
        ]
    return chosen, hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def read_calibration(chosen: list, spec: PatchSpec) -> torch.Tensor:
    from fpstore.cohort.cohorts import open_cohort_slide

    parts = []
    for slide, grid in chosen:
        xy = np.stack([grid.column("x").to_numpy(), grid.column("y").to_numpy()], 1)
        with open_cohort_slide(slide) as opened:
            parts.append(
                opened.read_patches(xy, float(grid.column("size_px")[0].as_py()), spec.out_px)
            )
    return (
        torch.from_numpy(np.concatenate(parts))
        if parts
        else torch.empty((0, spec.out_px, spec.out_px, 3), dtype=torch.uint8)
    )
