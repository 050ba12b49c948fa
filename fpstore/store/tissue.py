"""Tissue types per patch in the store: ``tissue/cohort=<cohort>/<slide_id>.parquet`` (TISSUE)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from fpstore.store.io import write_parquet_atomic
from fpstore.store.layout import StoreLayout, visible_files


def write_tissue(store, cohort: str, slide_id: str, table: pa.Table, metadata: dict):
    return write_parquet_atomic(
        table, StoreLayout.of(store).tissue_file(cohort, slide_id), metadata
    )


def read_tissue_types(
    store, cohort: str, slide_ids=None, columns=("patch_id", "tissue_type")
) -> pa.Table | None:
    """The cohort's tissue rows (of ``slide_ids`` if given); None when none are stored
    (`fpstore tissue predict` has not run)."""
    layout = StoreLayout.of(store)
    if slide_ids is None:
        files = visible_files(layout.tissue_dir(cohort))
    else:
        files = [p for p in (layout.tissue_file(cohort, s) for s in slide_ids) if p.is_file()]
    if not files:
        return None
    return pa.concat_tables(pq.read_table(f, columns=list(columns)) for f in files)
