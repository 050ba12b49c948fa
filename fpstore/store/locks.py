"""Advisory file locks (flock) on a local store: the kernel drops them when their holder dies.

Exclusive locks record 'host pid' of their holder in the file, for messages, and empty it on
release: a lock found holding a name when it is taken was abandoned, its holder died holding it
(``FileLock.abandoned``). Object storage has no locks: there one scheduler (the Ray driver)
hands out the work.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class FileLock:
    """A non-blocking flock on ``path`` (None: object storage, where acquiring always works)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.fd: int | None = None
        self.shared = False
        self.abandoned = False  # taken from a holder that died holding it (exclusive only)

    def acquire(self, shared: bool = False) -> bool:
        if self.path is None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        if not shared:
            self.abandoned = bool(os.pread(fd, 256, 0).strip())
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.uname().nodename} {os.getpid()}\n".encode())
        self.fd, self.shared = fd, shared
        return True

    def holder(self) -> str:
        """'host pid' of the process that holds the lock exclusively (or died holding it)."""
        try:
            return self.path.read_text().strip() if self.path else ""
        except OSError:
            return ""

    def release(self) -> None:
        if self.fd is not None:
            if not self.shared:
                os.ftruncate(self.fd, 0)  # released, not abandoned
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
