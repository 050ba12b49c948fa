"""Atomic writers: a file that exists under its final name is whole; a folder too.

Temporary files are named ``.<final name>.<random>.tmp`` in the destination folder: the
leading dot and the ``.tmp`` suffix keep them out of every ``*.parquet`` / ``*.json`` glob
(DuckDB's included), so readers never see one, even one left behind by ``kill -9``.

Folders (a cohort, a run, a model, a training cache) are filled under ``.staging/`` beside
their final place and moved there in one step (``staged_folder``): a rename, or, over an
existing folder, an atomic exchange of the two (Linux ``renameat2(RENAME_EXCHANGE)``). A
writer holds a lock while its staging folder exists, so the next writer removes what a
killed one left (``clean_staging``).

Every durable step (a file's fsync, a rename, a folder's fsync) passes ``durable_step``:
the fault-injection hook of the crash tests. ``FPSTORE_FAULT_AT=N`` makes the N-th step of
the process kill it (``FPSTORE_FAULT_MODE=kill``, the default: SIGKILL, as a power cut
would) or raise OSError (``raise``) before the step runs; ``FPSTORE_FAULT_LOG=FILE`` numbers
the steps in that file instead (one line each, so child processes share the count), which
is how a test counts a command's write points.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import io
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fpstore.errors import StoreError

TEMP_SUFFIX = ".tmp"
STAGING = ".staging"
FAULT_AT, FAULT_MODE, FAULT_LOG = "FPSTORE_FAULT_AT", "FPSTORE_FAULT_MODE", "FPSTORE_FAULT_LOG"

_steps = 0
_steps_lock = threading.Lock()


def _next_step(what: str, path) -> int:
    """This durable step's number: in FPSTORE_FAULT_LOG when set, else in this process."""
    global _steps
    log = os.environ.get(FAULT_LOG)
    if not log:
        with _steps_lock:
            _steps += 1
            return _steps
    with open(log, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # threads and child processes share one count
        handle.seek(0)
        number = handle.read().count(b"\n") + 1
        handle.write(f"{number} {os.getpid()} {what} {path}\n".encode())
        handle.flush()
        return number


def durable_step(what: str, path) -> None:
    """Mark one durable step (``fsync``, ``rename``, ``fsync-dir``, ``exchange``) about to run.

    Does nothing unless the fault-injection variables are set (module docstring)."""
    at = os.environ.get(FAULT_AT)
    if not at and not os.environ.get(FAULT_LOG):
        return
    number = _next_step(what, path)
    if at and number == int(at):
        if os.environ.get(FAULT_MODE, "kill") == "raise":
            raise OSError(errno.EIO, f"injected fault at durable step {number} ({what} {path})")
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_file(handle, path) -> None:
    """Flush and fsync the open binary file ``handle`` of ``path`` (a durable step)."""
    handle.flush()
    durable_step("fsync", path)
    os.fsync(handle.fileno())


def fsync_dir(folder) -> None:
    """fsync a folder, so that the renames in it reach the disk (a durable step)."""
    durable_step("fsync-dir", folder)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the system cannot (then the caller
    falls back to two renames)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def old_folder_name(folder: Path) -> Path:
    """Where a folder waits during a two-rename swap (systems without an atomic exchange):
    ``recover_folder`` moves it back if its writer died there."""
    return folder.parent / f".{folder.name}.old-{os.getpid()}"


def swap_folder(staged: Path, folder: Path) -> None:
    """Put the filled folder ``staged`` at ``folder`` in one step; an old ``folder`` is
    exchanged out (to ``staged``'s path) and removed."""
    durable_step("fsync-tree", staged)
    for root, _, files in os.walk(staged):  # the contents reach the disk before the name
        for name in [*files, "."]:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if not folder.exists():
        durable_step("rename", folder)
        os.rename(staged, folder)  # fails, rather than merge, if another writer got there
    else:
        durable_step("exchange", folder)
        if not _exchange(staged, folder):
            old = old_folder_name(folder)
            os.replace(folder, old)
            durable_step("rename", folder)
            os.replace(staged, folder)
            os.replace(old, staged)
    fsync_dir(folder.parent)
    if staged.exists():
        shutil.rmtree(staged)  # the old version, hidden under .staging/


def recover_folder(folder: Path) -> None:
    """Undo a two-rename swap its writer died in: the old folder back at ``folder``.

    Call it only when no writer of ``folder`` can be running (its lock is free); an old
    folder left beside a whole new one is removed."""
    if not folder.parent.is_dir():
        return
    for old in sorted(folder.parent.glob(f".{folder.name}.old-*")):
        if not folder.exists():
            os.replace(old, folder)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _lock(path: Path) -> int | None:
    """An fd holding ``path`` locked, or None if a live process holds it (FileNotFoundError
    if it is gone)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def clean_staging(parent: Path) -> int:
    """Remove what killed writers left in ``parent/.staging/`` (staging folders whose lock
    no process holds); returns how many."""
    staging = Path(parent) / STAGING
    if not staging.is_dir():
        return 0
    removed = 0
    for lock in staging.glob("*.lock"):
        try:
            fd = _lock(lock)
        except FileNotFoundError:
            continue  # another cleaner's
        if fd is None:
            continue  # a live writer
        try:
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed += 1
        finally:
            os.close(fd)
    with contextlib.suppress(OSError):
        staging.rmdir()
    return removed


def writer_alive(parent: Path, name: str) -> bool:
    """Whether a live process is filling a staging folder for ``parent/name``."""
    for lock in (Path(parent) / STAGING).glob(f"{name}.*.lock"):
        try:
            fd = _lock(lock)
        except FileNotFoundError:
            continue
        if fd is None:
            return True
        os.close(fd)
    return False


@contextlib.contextmanager
def staged_folder(folder):
    """Yield an empty hidden folder to fill; on success it replaces ``folder`` in one step
    (``swap_folder``), on error it is removed. Leftovers of killed writers are cleared first."""
    folder = Path(folder)
    staging = folder.parent / STAGING
    clean_staging(folder.parent)
    while True:
        staging.mkdir(parents=True, exist_ok=True)
        try:
            fd, name = tempfile.mkstemp(prefix=f"{folder.name}.", suffix=".lock.new", dir=staging)
            break
        except FileNotFoundError:
            continue  # another writer removed the empty .staging just now
    fcntl.flock(fd, fcntl.LOCK_EX)
    lock = Path(name[: -len(".new")])
    os.rename(name, lock)  # only now may a cleaner see it, and it is held
    staged = lock.with_suffix("")
    try:
        staged.mkdir()
        yield staged
        swap_folder(staged, folder)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)
        with contextlib.suppress(OSError):
            staging.rmdir()  # when no other writer uses it


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


def remove_dead_temporaries(path: Path) -> int:
    """Remove the temporary files of ``path`` whose writer process is gone (their names hold
    the writer's pid); for files any process may write, where no claim says who. Returns how
    many."""
    path = Path(path)
    if not path.parent.is_dir():
        return 0
    return _remove_dead(path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"))


def remove_dead_temporaries_in(folder: Path) -> int:
    """``remove_dead_temporaries`` for every file of ``folder``: once per run of a command
    that writes many files there (listing the folder per file would cost a listing each)."""
    folder = Path(folder)
    return _remove_dead(folder.glob(f".*{TEMP_SUFFIX}")) if folder.is_dir() else 0


def _remove_dead(leftovers) -> int:
    removed = 0
    for leftover in leftovers:
        # .<name>.<pid>.<random>.tmp (mkstemp's random part has no dot)
        parts = leftover.name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
        if len(parts) == 3 and parts[1].isdigit() and not _alive(int(parts[1])):
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


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
    # The writer's pid in the name lets ``remove_dead_temporaries`` tell a dead one's file.
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            fsync_file(handle, path)
        durable_step("rename", path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk before we report the file as written.
    fsync_dir(path.parent)
    return path


def write_atomic(path: Path, write) -> Path:
    """Call ``write(binary handle)`` and publish the file at ``path`` whole (temp, fsync,
    rename), for formats with their own writer (torch checkpoints)."""
    return _replace_atomically(path, write)


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
