"""Advisory file locks (flock) on a local store: the kernel drops them when their holder dies.

Exclusive locks record 'host pid' of their holder in the file, for messages. Object storage
has no locks: there one scheduler (the Ray driver) hands out the work.
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
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.uname().nodename} {os.getpid()}\n".encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        """'host pid' of the process that holds (or last held) the lock exclusively."""
        try:
            return self.path.read_text().strip() if self.path else ""
        except OSError:
            return ""

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
