"""Fingerprint files and their status: the writers, the stored settings, encoder resolution.

One Parquet file per slide and encoder (schema ``fingerprint_schema(dim)``), written to a
temporary name and renamed, with the extraction settings in its key-value metadata; a status
JSON per slide beside it. Readers pick the encoder of a cohort here, with one rule and one
error for every command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fpstore.errors import CohortError, StoreError
from fpstore.store.io import write_json_atomic, write_parquet_atomic
from fpstore.store.layout import StoreLayout, check_partition_value, visible_files
from fpstore.store.schema import (
    KEY_COLUMNS,
    SCHEMA_VERSION,
    fingerprint_schema,
    patch_id,
    read_metadata,
)

# zstd over byte-stream-split floats stores ReLU features in ~70% of their raw size
# (benchmarks/bench_storage.py).
PARQUET_OPTIONS = dict(
    compression="zstd",
    use_dictionary=["patient_id", "slide_id", "site"],
    column_encoding={"fingerprint.list.element": "BYTE_STREAM_SPLIT"},
)


def patch_keys_table(  # noqa: PLR0913  one argument per column of PATCH_KEY_FIELDS
    patient_id: str,
    slide_id: str,
    site: str | None,
    x: np.ndarray,
    y: np.ndarray,
    size_px: float,
    mpp: float,
    patch_um: float,
    out_px: int,
    tissue_fraction: np.ndarray,
) -> pa.Table:
    """The patch keys and coordinates of one slide's patches (PATCH_KEY_FIELDS)."""
    x, y = np.asarray(x, np.int64), np.asarray(y, np.int64)
    n = len(x)
    return pa.table(
        {
            "patient_id": pa.array([patient_id] * n, pa.string()),
            "slide_id": pa.array([slide_id] * n, pa.string()),
            "patch_id": pa.array([patch_id(slide_id, a, b, size_px) for a, b in zip(x, y)]),
            "site": pa.array([site] * n, pa.string()),
            "x": x,
            "y": y,
            "size_px": pa.array(np.full(n, size_px, np.float32)),
            "x_um": x * mpp,
            "y_um": y * mpp,
            "patch_um": pa.array(np.full(n, patch_um, np.float32)),
            "out_px": pa.array(np.full(n, out_px, np.int32)),
            "tissue_fraction": pa.array(np.asarray(tissue_fraction, np.float32)),
        }
    )


def fingerprint_table(keys: pa.Table, vectors: np.ndarray, dim: int) -> pa.Table:
    """Keys plus the ``fingerprint`` column; NaN or inf vectors are refused, never stored."""
    if not np.isfinite(vectors).all():
        slide = keys.column("slide_id")[0].as_py() if keys.num_rows else "?"
        raise StoreError(f"slide {slide}: the encoder returned NaN or inf values")
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)
    return keys.append_column(fingerprint_schema(dim).field("fingerprint"), column)


def write_fingerprints(store, encoder: str, cohort: str, slide_id: str, table, metadata: dict):
    check_partition_value("encoder id", encoder)
    path = StoreLayout.of(store).fingerprint_file(encoder, cohort, slide_id)
    return write_parquet_atomic(table, path, metadata, **PARQUET_OPTIONS)


def write_status(
    store,
    encoder: str,
    encoder_hash: str,
    cohort: str,
    slide_id: str,
    status: str,
    error: str = "",
    n_patches: int = 0,
    seconds: float = 0.0,
):
    """The slide's status JSON (ok / failed, with the error): the ``slides`` view reads it."""
    document = {
        "slide_id": slide_id,
        "status": status,
        "error": error,
        "n_patches": n_patches,
        "seconds": round(seconds, 3),
        "encoder_hash": encoder_hash,
        "pid": os.getpid(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return write_json_atomic(document, StoreLayout.of(store).status_file(encoder, cohort, slide_id))


@dataclass(frozen=True)
class StoredFile:
    """What a slide's fingerprint file holds, against the settings a run wants.

    state: missing; match (same settings); other-settings (``diff``: {key: (stored, wanted)});
    corrupt (unreadable: a truncated or damaged file, which extraction repairs); foreign (a
    readable Parquet file that fpstore did not write: ``detail`` says why).
    """

    state: str
    diff: dict = field(default_factory=dict)
    detail: str = ""

    def describe(self) -> str:
        if self.state == "other-settings":
            return ", ".join(f"{k}: stored {a!r}, wanted {b!r}" for k, (a, b) in self.diff.items())
        return self.detail or self.state


def stored_settings(path) -> dict[str, str]:
    """The fpstore metadata of a fingerprint file; StoreError if it is corrupt or foreign."""
    state, metadata = _inspect(path)
    if state.state in ("corrupt", "foreign"):
        raise StoreError(f"{path}: {state.detail}")
    return metadata


def _inspect(path) -> tuple[StoredFile, dict]:
    if not path.is_file():
        return StoredFile("missing"), {}
    try:
        schema = pq.read_schema(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        return StoredFile("corrupt", detail=f"corrupt Parquet file ({error})"), {}
    metadata = read_metadata(schema)
    if metadata.get("table") != "fingerprints" or "fingerprint" not in schema.names:
        return StoredFile(
            "foreign", detail="a Parquet file without fpstore's fingerprint metadata"
        ), metadata
    return StoredFile("match"), metadata


def stored_state(path, key: dict[str, str]) -> StoredFile:
    """The state of ``path`` against the wanted settings ``key`` (see StoredFile)."""
    state, stored = _inspect(path)
    if state.state != "match":
        return state
    diff = {k: (stored.get(k, "?"), v) for k, v in key.items() if stored.get(k) != v}
    return StoredFile("other-settings", diff) if diff else state


# Metadata that differs from slide to slide of one extraction, or says how to rebuild the
# encoder (paths may differ between resumed runs); everything else is a setting.
PER_SLIDE_FIELDS = ("slide_id", "n_patches", "fpstore_version")
INFO_FIELDS = ("encoder_spec", "precision_reason")
_CHECKED: dict = {}  # (folder, listing) -> settings: a partition is read once per listing


def partition_settings(store, encoder: str, cohort: str) -> dict[str, str]:
    """The extraction settings every fingerprint file of (encoder, cohort) shares.

    Raises StoreError, naming the files and the repair, when a file is corrupt or not
    fpstore's, belongs to a slide the cohort no longer has, or when the files were made
    with different settings (two runs with other settings, or a killed ``--force`` run).
    """
    from concurrent.futures import ThreadPoolExecutor

    from fpstore.store.cohorts import read_cohort

    layout = StoreLayout.of(store)
    folder = layout.fingerprint_dir(encoder, cohort)
    files = visible_files(folder)
    listing = (str(folder), tuple((f.name, _stamp(f)) for f in files))
    if listing in _CHECKED:
        return _CHECKED[listing]
    with ThreadPoolExecutor(max_workers=8) as pool:  # footers only; threads hide latency
        inspected = list(pool.map(_inspect, files))
    repair = f"`fpstore extract --cohort {cohort} --encoder {encoder}`"
    broken = [(f, state) for f, (state, _) in zip(files, inspected) if state.state != "match"]
    if broken:
        path, state = broken[0]
        raise StoreError(
            f"{len(broken)} fingerprint file(s) of cohort {cohort!r}, encoder {encoder!r} "
            f"are corrupt or not fpstore's (e.g. {path}: {state.detail}); {repair} rewrites "
            "corrupt files of its own; move foreign files out of the store"
        )
    try:
        known = {s.slide_id for s in read_cohort(layout, cohort).slide_records()}
    except CohortError:
        raise StoreError(
            f"fingerprints of cohort {cohort!r} (encoder {encoder!r}), which the store no "
            f"longer has: re-add the cohort, or remove {folder}"
        ) from None
    stale = [f.stem for f in files if f.stem not in known]
    if stale:
        raise StoreError(
            f"cohort {cohort!r}, encoder {encoder!r}: fingerprints of {len(stale)} slide(s) no "
            f"longer in the cohort ({', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}); "
            f"re-add the cohort with `fpstore cohort add {cohort} ... --force`, which removes them"
        )
    groups: dict[tuple, list[str]] = {}
    for path, (_, metadata) in zip(files, inspected):
        key = tuple(
            sorted(
                (k, v)
                for k, v in metadata.items()
                if k not in PER_SLIDE_FIELDS and k not in INFO_FIELDS
            )
        )
        groups.setdefault(key, []).append(path.stem)
    if len(groups) > 1:
        raise StoreError(_mixed(cohort, encoder, groups, repair))
    settings: dict[str, str] = dict(next(iter(groups))) if groups else {}
    if inspected:  # how to rebuild the encoder: the most recent file's word
        newest = inspected[-1][1]
        settings.update({k: newest[k] for k in INFO_FIELDS if k in newest})
    if settings and settings.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"cohort {cohort!r}, encoder {encoder!r}: fingerprints of schema version "
            f"{settings.get('schema_version')!r}; this fpstore reads {SCHEMA_VERSION!r}: "
            f"re-extract with {repair} --force"
        )
    _CHECKED[listing] = settings
    return settings


def _stamp(path) -> tuple:
    if isinstance(path, Path):
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns
    info = path.fs.info(path.path)  # object storage: size and ETag/mtime where given
    return info.get("size"), str(info.get("ETag") or info.get("LastModified") or info.get("mtime"))


def _mixed(cohort: str, encoder: str, groups: dict, repair: str) -> str:
    ordered = sorted(groups.items(), key=lambda item: -len(item[1]))
    common = set.intersection(*(set(settings) for settings, _ in ordered))
    parts = []
    for settings, slides in ordered:
        differ = ", ".join(f"{k}={v}" for k, v in settings if (k, v) not in common)
        named = ", ".join(slides[:3]) + (" ..." if len(slides) > 3 else "")
        parts.append(f"{len(slides)} slide(s) with {differ} ({named})")
    return (
        f"cohort {cohort!r}, encoder {encoder!r}: fingerprints made with {len(groups)} sets of "
        f"settings ({'; '.join(parts)}); readers refuse to mix them. Repair with {repair} "
        "--force and the settings you want (e.g. --patches all)"
    )


def read_slide_file(path, with_fingerprints: bool = True):
    """(keys table, (N, dim) float32 vectors or None, metadata) of one fingerprint file."""
    columns = KEY_COLUMNS + (["fingerprint"] if with_fingerprints else [])
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, KeyError, OSError) as error:
        raise StoreError(f"cannot read stored patches {str(path)!r}: {error}") from error
    vectors = None
    if with_fingerprints:
        column = table.column("fingerprint").combine_chunks()
        dim = column.type.list_size
        vectors = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
        table = table.drop_columns(["fingerprint"])
    return table, vectors, read_metadata(pq.read_schema(path))


def cohort_encoders(store, cohort: str) -> list[str]:
    """The encoders with fingerprints of ``cohort``."""
    found = StoreLayout.of(store).encoder_cohorts()
    return sorted(e for e, cohorts in found.items() if cohort in cohorts)


def resolve_encoder(store, cohort: str, encoder: str | None) -> str:
    """The encoder to read: the one given, or the only one with fingerprints of the cohort."""
    known = cohort_encoders(store, cohort)
    if encoder is None:
        if len(known) == 1:
            return known[0]
        if not known:
            raise StoreError(
                f"cohort {cohort!r} has no fingerprints in {str(store)!r}; run "
                f"`fpstore extract --cohort {cohort}` first"
            )
        raise StoreError(
            f"cohort {cohort!r} has fingerprints of several encoders ({', '.join(known)}); "
            "pick one with --encoder"
        )
    if encoder not in known:
        raise StoreError(
            f"no fingerprints of encoder {encoder!r} for cohort {cohort!r}; encoders with "
            f"fingerprints of it: {', '.join(known) or f'none, run `fpstore extract --cohort {cohort}`'}"
        )
    return encoder
