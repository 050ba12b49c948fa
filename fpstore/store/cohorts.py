"""Cohort tables in the store: typed readers and the one writer.

``cohorts/<name>/`` holds ``slides.parquet`` (SLIDES), ``labels.parquet`` (LABELS) and
``cohort.json`` (the summary ``fpstore cohort add`` wrote). Readers check the schema version
and name the known cohorts when asked for an unknown one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fpstore.errors import CohortError
from fpstore.store.io import recover_folder, staged_folder, write_parquet_atomic
from fpstore.store.layout import StoreLayout, partitions, visible_files
from fpstore.store.locks import FileLock
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
    recover_cohorts(layout)
    folders = sorted(layout.cohorts_dir.iterdir()) if layout.cohorts_dir.is_dir() else []
    return [f.name for f in folders if not f.name.startswith(".") and (f / "cohort.json").is_file()]


def unknown_cohort(store, name: str) -> CohortError:
    names = cohort_names(store)
    listing = ", ".join(names) if names else "none yet; add one with `fpstore cohort add`"
    return CohortError(f"no cohort {name!r} in store {str(store)!r}; cohorts: {listing}")


def resolve_cohort(store, name: str | None) -> str:
    """``name``, or the store's only cohort when none is given."""
    if name is not None:
        return name
    names = cohort_names(store)
    if len(names) == 1:
        return names[0]
    listing = ", ".join(names) if names else "none yet; add one with `fpstore cohort add`"
    raise CohortError(f"pass --cohort: the store {str(store)!r} holds cohorts {listing}")


def read_cohort_document(store, name: str) -> dict:
    layout = StoreLayout.of(store)
    recover_cohorts(layout)
    path = layout.cohort_file(name, "cohort.json")
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


def write_cohort(store, name: str, slides: pa.Table, labels: pa.Table, document: dict) -> dict:
    """Write the cohort (readers see the old one or the new one, never half), then remove
    what belonged only to slides it no longer has; returns {what: files removed}.

    Callers hold the cohort's lock (``cohort_lock``) so that no extraction runs meanwhile.
    """
    _publish(StoreLayout.of(store), name, slides, labels, document)
    return remove_stale_slides(store, name, set(slides.column("slide_id").to_pylist()))


def cohort_lock(store, name: str) -> FileLock:
    """The lock an extraction of ``name`` holds shared, and ``cohort add`` exclusively."""
    layout = StoreLayout.of(store)
    return FileLock(None if layout.is_remote else layout.cohort_lock_file(name))


def remove_stale_slides(store, name: str, keep: set[str]) -> dict[str, int]:
    """Delete the fingerprints, status files, claims and tissue types of ``name``'s slides
    that are not in ``keep``. Idempotent: rerunning finishes an interrupted clean-up."""
    layout = StoreLayout.of(store)
    stale: dict[str, list] = {"fingerprints": [], "status": [], "tissue": []}
    encoders = set(partitions(layout.fingerprints_dir, "encoder"))
    for encoder in sorted(encoders | set(partitions(layout.status_root, "encoder"))):
        folder = layout.fingerprint_dir(encoder, name)
        stale["fingerprints"] += [f for f in visible_files(folder) if f.stem not in keep]
        status = layout.status_dir(encoder, name)
        stale["status"] += [f for f in visible_files(status, "*.json") if f.stem not in keep]
        stale["status"] += [
            f
            for f in (status.glob(".*.lock") if status.is_dir() else [])
            if f.name[1:-5] not in keep
        ]
    stale["tissue"] = [f for f in visible_files(layout.tissue_dir(name)) if f.stem not in keep]
    for paths in stale.values():
        for path in paths:
            path.unlink(missing_ok=True)
    return {what: len(paths) for what, paths in stale.items()}


def _publish(layout: StoreLayout, name: str, slides, labels, document: dict) -> None:
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
    # Filled aside and swapped in one step: readers see the old cohort or the new one.
    with staged_folder(target) as tmp:
        write_parquet_atomic(slides, tmp / "slides.parquet", file_metadata("slides", cohort=name))
        write_parquet_atomic(labels, tmp / "labels.parquet", file_metadata("labels", cohort=name))
        (tmp / "cohort.json").write_text(json.dumps(document, indent=2))


def recover_cohorts(layout: StoreLayout) -> None:
    """Put back a cohort whose ``cohort add --force`` died between the two renames of a
    folder swap (``.<cohort>.old-<pid>``, where no atomic exchange exists or an older
    fpstore wrote it), once its lock shows no writer alive."""
    if layout.is_remote or not layout.cohorts_dir.is_dir():
        return
    for old in layout.cohorts_dir.glob(".*.old-*"):
        name = old.name[1:].rsplit(".old-", 1)[0]
        lock = cohort_lock(layout, name)
        try:
            if lock.acquire():
                recover_folder(layout.cohort_dir(name))
        except OSError:
            return  # a read-only store: nothing can be moved, the readers go on without it
        finally:
            lock.release()
