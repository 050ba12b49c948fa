"""An LMDB cache of patch pixels for training loops that revisit patches many times.

Keys are patch ids (``fpstore.store.schema.patch_id``). A value is

    b"FPC1" | uint32 header length (little endian) | JSON header | encoded image

where the header holds the codec and the caller's metadata (slide_id, x, y,
size_px, ...) and the image is JPEG (default, quality 90, 4:4:4 chroma so stain
colours are not smeared) or PNG (lossless). ``get`` returns the decoded RGB
uint8 array and the metadata.

Workers: the environment is opened lazily, per process (the pid is checked on
each access), read-only with ``lock=False``; a PatchCache pickles as its path and
settings. So a cache opened in the parent can be handed to DataLoader workers
under fork or spawn. Do not write to a cache while a training loop reads it.
Writes go in batched transactions; the memory map grows (doubling) as needed.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fpstore.config import check_choice, check_range
from fpstore.errors import StoreError

MAGIC = b"FPC1"
_INFO_KEY = b"codec"
_MAX_KEY_BYTES = 511  # LMDB's default key size limit
_OPEN: dict[tuple[int, str], dict] = {}  # environments open in this process, by (pid, path)


@dataclass(frozen=True)
class CacheCodec:
    """How patch pixels are encoded in the cache."""

    format: str = "jpeg"
    quality: int = 90  # JPEG quality; PNG is lossless and ignores it

    def __post_init__(self):
        check_choice("CacheCodec", "format", self.format, ("jpeg", "png"))
        check_range("CacheCodec", "quality", self.quality, 1, 100)

    def encode(self, image: np.ndarray) -> bytes:
        import imagecodecs

        if self.format == "png":
            return bytes(imagecodecs.png_encode(image))
        return bytes(imagecodecs.jpeg8_encode(image, level=self.quality, subsampling="444"))


def _decode(codec: str, data: bytes) -> np.ndarray:
    import imagecodecs

    if codec == "png":
        return imagecodecs.png_decode(data)
    return imagecodecs.jpeg8_decode(data)


class CachedPatch(NamedTuple):
    image: np.ndarray  # (H, W, 3) uint8 RGB
    meta: dict


class PatchCache:
    """LMDB patch cache at folder ``path``; ``readonly=False`` creates or appends."""

    def __init__(
        self,
        path: str | Path,
        readonly: bool = True,
        codec: CacheCodec = CacheCodec(),
        map_size: int = 256 << 20,
        batch_size: int = 512,
    ):
        self.path = Path(path)
        self.readonly = readonly
        self.codec = codec
        self.map_size = int(map_size)
        self.batch_size = int(batch_size)
        check_range("PatchCache", "batch_size", self.batch_size, 1)
        if readonly and not (self.path / "data.mdb").exists():
            raise StoreError(
                f"no patch cache at {self.path}; build one with PatchCache(path, readonly=False)"
                " and put_many, or check the path"
            )
        self._env = None
        self._db = None
        self._pid = None

    # -- per-process environment --
    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_env=None, _db=None, _pid=None)
        return state

    def _open(self):
        if self._env is not None and self._pid == os.getpid():
            return self._env, self._db
        # After fork the parent's environments must not be used (LMDB forbids it), and
        # py-lmdb refuses to open one path twice in a process: share one per (pid, path),
        # and let a forked child close its inherited copies first (this unmaps them in the
        # child only; the parent's stay open).
        _close_inherited()
        key = (os.getpid(), str(self.path.resolve()))
        entry = _OPEN.get(key)
        if entry is None:
            entry = _OPEN[key] = self._open_env()
        elif entry["readonly"] and not self.readonly:
            raise StoreError(
                f"patch cache {self.path} is open read-only in this process; close its readers "
                "before writing"
            )
        entry["users"] += 1
        self._env, self._db, self._pid = entry["env"], entry["db"], os.getpid()
        if not self.readonly:
            self._check_codec(entry["info_db"])
        return self._env, self._db

    def _open_env(self) -> dict:
        import lmdb

        if self.readonly:
            env = lmdb.open(
                str(self.path),
                readonly=True,
                lock=False,
                readahead=False,
                max_readers=512,
                max_dbs=2,
            )
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            env = lmdb.open(str(self.path), map_size=self.map_size, readahead=False, max_dbs=2)
        try:
            db = env.open_db(b"patches", create=not self.readonly)
            info_db = env.open_db(b"info", create=not self.readonly)
        except lmdb.Error as error:
            env.close()
            raise StoreError(f"{self.path} is not an fpstore patch cache: {error}") from error
        return {"env": env, "db": db, "info_db": info_db, "readonly": self.readonly, "users": 0}

    def _check_codec(self, info_db) -> None:
        """A cache keeps the codec it was created with; appending with another is refused."""
        with self._env.begin(db=info_db, write=True) as txn:
            stored = txn.get(_INFO_KEY)
            if stored is None:
                txn.put(_INFO_KEY, json.dumps(vars(self.codec)).encode())
                return
        existing = CacheCodec(**json.loads(stored))
        if existing != self.codec:
            self.close()
            raise StoreError(
                f"patch cache {self.path} holds {existing}; it cannot take patches "
                f"encoded as {self.codec}: use that codec or another cache folder"
            )

    def close(self) -> None:
        """Release this handle; the environment closes with the process's last handle."""
        if self._env is not None and self._pid == os.getpid():
            key = (self._pid, str(self.path.resolve()))
            entry = _OPEN.get(key)
            if entry is not None:
                entry["users"] -= 1
                if entry["users"] <= 0:
                    del _OPEN[key]
                    entry["env"].close()
        self._env = self._db = self._pid = None

    def __enter__(self) -> PatchCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing --
    def put_many(self, keys, images, meta=None) -> int:
        """Store ``images`` (N, H, W, 3 uint8, or an iterable of such arrays) under ``keys``.

        ``meta`` is an optional list of JSON-serialisable dicts (one per image).
        Existing keys are overwritten. Returns the number of patches written.
        """
        if self.readonly:
            raise StoreError(
                f"patch cache {self.path} is open read-only; open it with readonly=False"
            )
        keys = list(keys)
        meta = [{}] * len(keys) if meta is None else list(meta)
        if len(meta) != len(keys):
            raise StoreError(f"put_many got {len(keys)} keys but {len(meta)} meta entries")
        records = []
        written = 0
        for key, image, extra in zip(keys, images, meta, strict=True):
            records.append((self._key(key), self._value(key, image, extra)))
            if len(records) >= self.batch_size:
                written += self._write(records)
                records = []
        return written + (self._write(records) if records else 0)

    def _key(self, key: str) -> bytes:
        encoded = str(key).encode()
        if not encoded or len(encoded) > _MAX_KEY_BYTES:
            raise StoreError(f"patch key {key!r} must be 1-{_MAX_KEY_BYTES} bytes of UTF-8")
        return encoded

    def _value(self, key, image, extra: dict) -> bytes:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise StoreError(
                f"patch {key!r}: image of shape {image.shape} and type {image.dtype}; "
                "expected (H, W, 3) uint8 RGB"
            )
        header = json.dumps({"codec": self.codec.format, **extra}, default=_jsonable).encode()
        data = self.codec.encode(np.ascontiguousarray(image))
        return MAGIC + struct.pack("<I", len(header)) + header + data

    def _write(self, records: list[tuple[bytes, bytes]]) -> int:
        import lmdb

        env, db = self._open()
        while True:
            try:
                with env.begin(db=db, write=True) as txn:
                    for key, value in records:
                        txn.put(key, value)
                return len(records)
            except lmdb.MapFullError:
                # The transaction was aborted: grow the map and write the batch again.
                self.map_size = env.info()["map_size"] * 2
                env.set_mapsize(self.map_size)

    # -- reading --
    def get(self, key: str) -> CachedPatch:
        """The decoded image and metadata of one patch; KeyError when absent."""
        env, db = self._open()
        with env.begin(db=db, buffers=True) as txn:
            value = txn.get(self._key(key))
            if value is None:
                raise KeyError(f"patch {key!r} is not in the cache {self.path}")
            value = bytes(value)
        if value[:4] != MAGIC:
            raise StoreError(f"patch {key!r} in {self.path} is not an fpstore cache record")
        (length,) = struct.unpack_from("<I", value, 4)
        meta = json.loads(value[8 : 8 + length])
        image = _decode(meta.pop("codec"), value[8 + length :])
        return CachedPatch(image, meta)

    def __contains__(self, key: str) -> bool:
        env, db = self._open()
        with env.begin(db=db) as txn:
            return txn.get(self._key(key)) is not None

    def keys(self) -> list[str]:
        """All patch keys, in LMDB's (byte-sorted) order."""
        env, db = self._open()
        with env.begin(db=db) as txn:
            return [bytes(k).decode() for k in txn.cursor().iternext(keys=True, values=False)]

    def __len__(self) -> int:
        env, db = self._open()
        with env.begin(db=db) as txn:
            return txn.stat(db)["entries"]


def _close_inherited() -> None:
    pid = os.getpid()
    for key in [k for k in _OPEN if k[0] != pid]:
        _OPEN.pop(key)["env"].close()


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"patch metadata value {value!r} is not JSON-serialisable")
