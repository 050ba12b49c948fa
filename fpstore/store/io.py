"""Atomic writers: a file that exists under its final name is whole.

Temporary files are named ``.<final name>.<random>.tmp`` in the destination folder: the
leading dot and the ``.tmp`` suffix keep them out of every ``*.parquet`` / ``*.json`` glob
(DuckDB's included), so readers never see one, even one left behind by ``kill -9``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fpstore.errors import StoreError

TEMP_SUFFIX = ".tmp"


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def remove_leftover_temporaries(path: Path) -> int:
    """Remove the temporary files of ``path`` that a killed writer left (``.<name>.*.tmp``).

    Only for a caller that alone may write ``path`` now (the holder of its slide's claim):
    a temporary file of that name can then belong to no live writer. It lists the folder, so
    call it when a writer is known to have died, not on every write. Returns how many."""
    path = Path(path)
    if not path.parent.is_dir():
        return 0
    removed = 0
    for leftover in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed


def check_not_null(table: pa.Table, path: Path | str = "") -> None:
    """Raise StoreError if a non-nullable field holds nulls (Parquet readers do not enforce it)."""
    for field in table.schema:
        if not field.nullable and table.column(field.name).null_count:
            raise StoreError(
                f"{path or 'table'}: column {field.name!r} has "
                f"{table.column(field.name).null_count} null values but may not be null"
            )


def _replace_atomically(path: Path, write) -> Path:
    """Call ``write(binary handle)`` on a temporary file, fsync it, rename it to ``path``."""
    from fpstore.store.remote import RemotePath

    if isinstance(path, RemotePath):  # object storage: write in memory, publish in one PUT
        buffer = io.BytesIO()
        write(buffer)
        path.write_bytes(buffer.getvalue())
        return path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk before we report the file as written.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_parquet_atomic(table: pa.Table, path: Path, metadata: dict, **options) -> Path:
    """Write ``table`` to ``path`` with key-value ``metadata`` merged into its schema.

    Written to a temporary name in the same folder, fsynced, then renamed, so readers
    never see half a file and a crash leaves the previous version in place. Non-nullable
    fields are checked for nulls first. ``options`` go to ``pyarrow.parquet.write_table``.
    """
    check_not_null(table, path)
    merged = dict(table.schema.metadata or {})
    merged.update({_as_bytes(k): _as_bytes(v) for k, v in metadata.items()})
    table = table.replace_schema_metadata(merged)
    return _replace_atomically(path, lambda handle: pq.write_table(table, handle, **options))


def write_json_atomic(document, path: Path) -> Path:
    """Write a JSON document atomically (same temp-and-rename rule as the Parquet files)."""
    data = json.dumps(document, indent=2, sort_keys=True, default=str).encode()
    return _replace_atomically(path, lambda handle: handle.write(data))


def write_npy_atomic(array, path: Path) -> Path:
    """Write a numpy array as .npy atomically (same temp-and-rename rule)."""
    return _replace_atomically(path, lambda handle: np.save(handle, array))


def write_npz_atomic(arrays: dict, path: Path) -> Path:
    """Write named arrays as a compressed .npz atomically (same temp-and-rename rule)."""
    return _replace_atomically(path, lambda handle: np.savez_compressed(handle, **arrays))


def write_text_atomic(text: str, path: Path) -> Path:
    """Write a UTF-8 text file atomically (same temp-and-rename rule)."""
    return _replace_atomically(path, lambda handle: handle.write(text.encode()))
