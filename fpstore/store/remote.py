"""Stores on object storage: ``--store s3://bucket/prefix`` (or any fsspec URL).

A store is a folder of Parquet and JSON files; on object storage it is the same keys under a
prefix. :func:`store_root` turns what the user gave into either a :class:`pathlib.Path` or a
:class:`RemotePath`, which offers the few pathlib operations the store code uses (``/``,
``name``, ``stem``, ``parent``, ``with_name``, ``is_file``, ``is_dir``, ``iterdir``, ``glob``,
``read_text``, ``mkdir``) over an fsspec filesystem. ``str()`` and ``os.fspath()`` give the
full URL, which pyarrow (``pq.read_table``) and DuckDB (through ``register_filesystem``) read
directly.

Atomicity (write-then-publish): an object store has no rename, but a PUT is atomic: an object
is invisible until its upload completes, and S3 gives strong read-after-write consistency.
Writers (``fpstore.store.io``) serialise each file in memory first and then upload it in one
PUT to its final key, so a key that exists holds a whole file and a killed writer leaves
nothing (an unfinished multipart upload is never listed). Each slide's fingerprint file is its
own commit point; its status JSON is published after it. Cross-process locks do not exist on
object storage: there, one scheduler (the Ray driver) hands each slide to exactly one task.

Credentials and endpoints come from the usual AWS settings (environment, ``~/.aws``), which
both s3fs and pyarrow read: e.g. ``AWS_ENDPOINT_URL=http://127.0.0.1:9000`` for MinIO.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from pathlib import Path

from fpstore.errors import StoreError

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.+)$")


def is_remote(store) -> bool:
    """True for a URL with a scheme other than file:// (s3://, gs://, memory://...)."""
    if isinstance(store, RemotePath):
        return True
    match = _URL.match(store) if isinstance(store, str) else None
    return match is not None and match.group(1).lower() != "file"


def local_path(value) -> Path:
    """file:///abs/path (or file:/abs/path, what pathlib makes of it) -> /abs/path."""
    text = str(value)
    return Path("/" + text[5:].lstrip("/")) if text.lower().startswith("file:") else Path(text)


def store_root(store) -> Path | RemotePath:
    """A local store as a Path; a URL as a RemotePath on its fsspec filesystem."""
    if isinstance(store, RemotePath):
        return store
    if str(store).lower().startswith("file:"):  # file:///abs, or file:/abs once a Path folded it
        return local_path(store)
    match = _URL.match(store) if isinstance(store, str) else None
    if match is None:
        return Path(store)
    protocol = match.group(1).lower()
    try:
        import fsspec
    except ImportError as error:  # pragma: no cover - fsspec comes with tiatoolbox
        raise StoreError(f"store {store!r} needs fsspec: pip install fpstore[s3]") from error
    try:
        # No listing cache: a store is listed to build views, and must see files written since.
        fs, path = fsspec.core.url_to_fs(store, use_listings_cache=False, skip_instance_cache=True)
    except (ImportError, ValueError) as error:
        raise StoreError(
            f"store {store!r}: no filesystem for {protocol}:// ({error}); for S3 "
            "install the s3 extra: pip install fpstore[s3]"
        ) from error
    return RemotePath(fs, path.rstrip("/"), protocol)


class RemotePath:
    """A key prefix on an fsspec filesystem that quacks like the pathlib.Path the store uses."""

    def __init__(self, fs, path: str, protocol: str):
        self.fs, self.path, self.protocol = fs, path, protocol

    # -- names --
    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    __fspath__ = __str__

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: RemotePath) -> bool:  # sorted() over listings
        return self.path < other.path

    def __truediv__(self, part) -> RemotePath:
        return RemotePath(self.fs, posixpath.join(self.path, str(part)), self.protocol)

    def _sibling(self, path: str) -> RemotePath:
        return RemotePath(self.fs, path, self.protocol)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> RemotePath:
        return self._sibling(posixpath.dirname(self.path))

    def with_name(self, name: str) -> RemotePath:
        return self._sibling(posixpath.join(posixpath.dirname(self.path), name))

    # -- queries --
    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def iterdir(self):
        if not self.is_dir():
            return iter(())
        return iter(
            self._sibling(p.rstrip("/"))
            for p in sorted(self.fs.ls(self.path, detail=False))
            if p.rstrip("/") != self.path
        )

    def glob(self, pattern: str):
        """Keys under this prefix matching ``pattern`` ('*' stays within one level, as in pathlib)."""
        found = self.fs.glob(posixpath.join(self.path, pattern))
        full = posixpath.join(self.path, pattern)
        return iter(
            self._sibling(p)
            for p in sorted(found)
            if fnmatch.fnmatchcase(p, full) and p.count("/") == full.count("/")
        )

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # -- writes --
    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: object stores have no folders, a key's prefix exists with the key."""

    def write_bytes(self, data: bytes) -> int:
        """Publish ``data`` under this key in one PUT: readers see all of it or nothing."""
        self.fs.pipe_file(self.path, data)
        return len(data)

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.fs.exists(self.path):
            return
        self.fs.rm_file(self.path)


def register_with_duckdb(connection, root) -> None:
    """Let DuckDB's read_parquet/read_json open ``root``'s URLs through its fsspec filesystem."""
    if isinstance(root, RemotePath):
        connection.register_filesystem(root.fs)


def copy_tree(source, target) -> int:
    """Copy every file under ``source`` to ``target`` (either may be local or a URL).

    The way to put a store's ``cohorts/<name>`` folder (or a whole store) on object storage;
    each file is published in one PUT. Returns the number of files copied.
    """
    source, target = store_root(source), store_root(target)
    if not source.is_dir():
        raise StoreError(f"{str(source)!r} is not a folder; nothing to copy")
    files = [p for p in _walk(source) if not p.name.startswith(".")]
    for path in files:
        relative = _relative(path, source)
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        (target / relative).write_bytes(path.read_bytes())
    return len(files)


def _walk(root):
    for child in root.iterdir():
        if child.is_dir():
            yield from _walk(child)
        else:
            yield child


def _relative(path, root) -> str:
    return str(path)[len(str(root)) :].lstrip("/")
