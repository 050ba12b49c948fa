"""Cohort tables in the store: typed readers and the one writer.

``cohorts/<name>/`` holds ``slides.parquet`` (SLIDES), ``labels.parquet`` (LABELS) and
``cohort.json`` (the summary ``fpstore cohort add`` wrote). Readers check the schema version
and name the known cohorts when asked for an unknown one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fpstore.errors import CohortError
from fpstore.store.io import write_parquet_atomic
from fpstore.store.layout import StoreLayout
from fpstore.store.schema import LABELS, SCHEMA_VERSION, SLIDES, file_metadata, read_metadata


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a cohort, as ``cohort add`` registered it."""

    slide_id: str
    patient_id: str | None  # None: no patient for this slide in the clinical table
    path: str
    site: str | None
    mpp_override: float | None


@dataclass
class StoredCohort:
    """A cohort's tables (schemas SLIDES, LABELS) and its cohort.json document."""

    name: str
    slides: pa.Table
    labels: pa.Table
    document: dict

    def slide_records(self) -> list[CohortSlide]:
        return [CohortSlide(**row) for row in self.slides.to_pylist()]

    def slide(self, slide_id: str) -> CohortSlide:
        for record in self.slide_records():
            if record.slide_id == slide_id:
                return record
        raise CohortError(f"slide {slide_id!r} is not in cohort {self.name!r}")

    def marker_labels(self, marker: str) -> pa.Table:
        """The LABELS rows of one marker."""
        return self.labels.filter(pc.equal(self.labels.column("marker"), marker))


def cohort_names(store) -> list[str]:
    layout = StoreLayout.of(store)
    folders = sorted(layout.cohorts_dir.iterdir()) if layout.cohorts_dir.is_dir() else []
    return [f.name for f in folders if not f.name.startswith(".") and (f / "cohort.json").is_file()]


def unknown_cohort(store, name: str) -> CohortError:
    names = cohort_names(store)
    listing = ", ".join(names) if names else "none yet; add one with `fpstore cohort add`"
    return CohortError(f"no cohort {name!r} in store {str(store)!r}; cohorts: {listing}")


def read_cohort_document(store, name: str) -> dict:
    path = StoreLayout.of(store).cohort_file(name, "cohort.json")
    if not path.is_file():
        raise unknown_cohort(store, name)
    return json.loads(path.read_text())


def _read_table(path, schema: pa.Schema) -> pa.Table:
    table = pq.read_table(path)
    version = read_metadata(table.schema).get("schema_version")
    if version != SCHEMA_VERSION:
        raise CohortError(
            f"{str(path)!r} has schema version {version!r}, this fpstore reads {SCHEMA_VERSION!r}; "
            "re-add the cohort with `fpstore cohort add ... --force`"
        )
    return table.select(schema.names).cast(schema)


def read_cohort(store, name: str) -> StoredCohort:
    layout = StoreLayout.of(store)
    document = read_cohort_document(layout, name)
    return StoredCohort(
        name=name,
        slides=_read_table(layout.cohort_file(name, "slides.parquet"), SLIDES),
        labels=_read_table(layout.cohort_file(name, "labels.parquet"), LABELS),
        document=document,
    )


def write_cohort(store, name: str, slides: pa.Table, labels: pa.Table, document: dict) -> None:
    """Build the cohort in a temporary folder, then swap it in: readers see old or new,
    never half."""
    layout = StoreLayout.of(store)
    target = layout.cohort_dir(name)
    if layout.is_remote:
        # No folder rename on object storage: publish the tables, then cohort.json (the key
        # the readers look for) last.
        for table, kind in ((slides, "slides"), (labels, "labels")):
            write_parquet_atomic(
                table, target / f"{kind}.parquet", file_metadata(kind, cohort=name)
            )
        (target / "cohort.json").write_bytes(json.dumps(document, indent=2).encode())
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_parquet_atomic(slides, tmp / "slides.parquet", file_metadata("slides", cohort=name))
        write_parquet_atomic(labels, tmp / "labels.parquet", file_metadata("labels", cohort=name))
        (tmp / "cohort.json").write_text(json.dumps(document, indent=2))
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
