"""Planning a run: which patches of which slides, and the settings that make files comparable.

plan     a patient's slides: tissue mask (remembered in the store, ``fpstore.slides.
         mask_cache``), patch grid, n patches sampled per patient (pooled over the
         patient's slides); the local engine plans in its reader processes as slides are
         claimed (``plan_patient``), the Ray engine in one task per slide (``plan_slides``)
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


@dataclass(frozen=True)
class SlideWork:
    """A slide to extract, not yet planned, with every slide of its patient (sampling
    pools them); what the engines receive and claims defer."""

    slide: CohortSlide
    patient_slides: tuple[CohortSlide, ...]

    @property
    def slide_id(self) -> str:
        return self.slide.slide_id


def slide_grid(slide: CohortSlide, spec: PatchSpec, store=None):
    """(slide info, grid table) of one cohort slide, its tissue mask remembered in
    ``store`` (None: computed, not stored); raises FpstoreError on a bad slide, and on one
    without a single tissue square (a blank, a fluorescence scan)."""
    from fpstore.slides.grid import no_patch_reason, patch_grid
    from fpstore.slides.mask_cache import remembered_mask
    from fpstore.slides.slide import Slide

    info, mask = remembered_mask(slide.path, slide.mpp_override, store)
    grid = patch_grid(Slide(info), spec, mask)
    if not len(grid):
        raise SlideError(no_patch_reason(Slide(info), spec, mask))
    return info, grid


def grid_or_error(slide: CohortSlide, spec: PatchSpec, store=None):
    """(slide info, grid, "") of one cohort slide, or (None, None, the error) for a bad one."""
    try:
        return (*slide_grid(slide, spec, store), "")
    except FpstoreError as error:
        return None, None, str(error)


def _plans(slides, infos: dict, grids: dict, spec: PatchSpec, n, seed) -> dict[str, SlidePlan]:
    """The plans of the slides with a grid: n patches per patient, pooled over its slides."""
    from fpstore.slides.grid import sample_patches

    patients = {s.slide_id: s.patient_id for s in slides if s.slide_id in grids}
    sampled = sample_patches(grids, n, seed, patients=patients)
    by_id = {s.slide_id: s for s in slides}
    plans = {}
    for slide_id, table in sampled.items():
        info = infos[slide_id]
        size = float(table.column("size_px")[0].as_py()) if len(table) else spec.patch_um / info.mpp
        plans[slide_id] = SlidePlan(by_id[slide_id], info.mpp, size, table)
    return plans


def plan_patient(
    slides: tuple[CohortSlide, ...],
    wanted: list[str],
    spec: PatchSpec,
    n: int | None,
    seed: int,
    store=None,
) -> tuple[list[SlidePlan], dict[str, str]]:
    """Plan the ``wanted`` slides of one patient whose slides are ``slides``: (their plans,
    {slide_id: error} of the wanted ones that cannot be read).

    The sample is the one ``plan_slides`` draws over a whole cohort: sampling is seeded
    per patient, and a slide that cannot be read drops out of its patient's pool in both.
    """
    infos, grids, failed = {}, {}, {}
    for slide in slides:
        info, grid, error = grid_or_error(slide, spec, store)
        if error:
            failed[slide.slide_id] = error
        else:
            infos[slide.slide_id], grids[slide.slide_id] = info, grid
    plans = _plans(slides, infos, grids, spec, n, seed)
    return (
        [plans[s] for s in wanted if s in plans],
        {s: e for s, e in failed.items() if s in wanted},
    )


def plan_slides(
    slides: list[CohortSlide],
    spec: PatchSpec,
    n: int | None,
    seed: int,
    failed: dict[str, str],
    store=None,
    progress: bool = True,
    map_fn=map,
) -> dict[str, SlidePlan]:
    """Tissue patches of each slide, n sampled per patient (pooled over its slides).

    ``map_fn(grid_or_error, slides, specs, stores)`` yields one grid per slide in order:
    Ray tasks on the Ray engine. ``store`` remembers the tissue masks.
    """
    from tqdm import tqdm

    infos, grids = {}, {}
    mapped = map_fn(grid_or_error, slides, [spec] * len(slides), [store] * len(slides))
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
    return _plans(slides, infos, grids, spec, n, seed)


def resume_key(encoder, config: ExtractConfig) -> dict[str, str]:
    """The file metadata that must match for a stored slide to count as done (int8 runs add
    their calibration digest). ``config.precision`` is the resolved one, never 'auto': a
    precision that auto chose counts as that precision chosen by hand."""
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


def calibration_set(slides: list[CohortSlide], spec: PatchSpec, store=None) -> tuple[list, str]:
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
        _, grid, error = grid_or_error(slide, spec, store)
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
