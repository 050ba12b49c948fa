"""The thin layer between the store and the figures: patch scores, tissue types, slides.

Reads runs, tissue types and cohorts through ``fpstore.store`` and hands plain numpy arrays
to the figure code, which never sees the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fpstore.errors import StoreError
from fpstore.store.cohorts import read_cohort
from fpstore.store.runs import Run
from fpstore.store.tissue import read_tissue_types


def parse_patch_ids(patch_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, size_px) level-0 arrays from ids "<slide_id>/<x>_<y>_<size_px>" (schema.patch_id)."""
    try:
        parts = np.array([p.rsplit("/", 1)[1].split("_") for p in patch_ids], dtype=np.int64)
    except (IndexError, ValueError) as error:
        raise StoreError(
            f"patch ids must look like '<slide_id>/<x>_<y>_<size_px>': {error}"
        ) from None
    parts = parts.reshape(-1, 3)
    return parts[:, 0], parts[:, 1], parts[:, 2].astype(np.float64)


@dataclass
class SlidePatches:
    """One slide's scored patches as arrays, aligned row by row."""

    cohort: str
    patch_ids: list[str]
    x: np.ndarray
    y: np.ndarray
    size_px: np.ndarray
    scores: np.ndarray
    tissue_types: np.ndarray | None  # object array; None when no tissue table exists
    attention: np.ndarray | None = None  # the head's attention (abmil runs); None otherwise

    @property
    def has_tissue(self) -> bool:
        return self.tissue_types is not None


def lookup(keys: list[str], table: pa.Table | None, column: str) -> np.ndarray | None:
    """``table[column]`` for each key of ``keys`` (by patch_id); None where absent."""
    if table is None:
        return None
    index = dict(zip(table.column("patch_id").to_pylist(), table.column(column).to_pylist()))
    return np.array([index.get(k) for k in keys], dtype=object)


def slide_patches(store, run: Run, slide_id: str) -> SlidePatches:
    table = run.patch_scores(slide_id)
    if table.num_rows == 0:
        scored = run.slides_with_patch_scores()
        raise StoreError(
            f"run {run.run_id!r} has no patch scores for slide {slide_id!r}; slides with scores: "
            f"{', '.join(scored[:10]) or 'none'}{' ...' if len(scored) > 10 else ''}. "
            "A full heatmap "
            "needs the slide extracted with `fpstore extract --patches all` and classified"
        )
    cohort = table.column("cohort")[0].as_py()
    ids = table.column("patch_id").to_pylist()
    x, y, size = parse_patch_ids(ids)
    types = lookup(ids, read_tissue_types(store, cohort, [slide_id]), "tissue_type")
    attention = None
    if run.has_attention:
        found = lookup(ids, run.patch_attention(slide_id), "attention")
        attention = np.array([np.nan if a is None else a for a in found], np.float64)
    return SlidePatches(cohort, ids, x, y, size, table.column("score").to_numpy(), types, attention)


def open_run_slide(store, cohort: str, slide_id: str):
    """A slide of a run's cohort, opened as the cohort registered it (its mpp override)."""
    from fpstore.cohort.cohorts import open_cohort_slide

    return open_cohort_slide(read_cohort(store, cohort).slide(slide_id))


def patient_labels(store, cohort: str, marker: str) -> dict[str, int | None]:
    """Clinical status (1, 0 or None) per patient for ``marker`` from the cohort's labels."""
    table = read_cohort(store, cohort).marker_labels(marker)
    return dict(zip(table.column("patient_id").to_pylist(), table.column("status").to_pylist()))
