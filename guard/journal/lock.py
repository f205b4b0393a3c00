"""One writer per journal: an advisory ``flock`` on the journal file, held from start to stop.

SQLite's own locks do not stop a second daemon: in WAL mode two connections may both write,
each with its own idea of the next seq (the second dies on ``UNIQUE constraint failed``, and its
reader loses its results). The daemon and the exclusive maintenance tools (``replay``, ``compact``,
``keys rotate``) therefore take this lock before they read or change anything; read-only tools
(``journal verify|show|export|anchor``, ``reconcile``) do not, so they still run beside the daemon.

``flock`` locks belong to the open file description, not the process, so a second open in the same
process conflicts too, and the kernel drops the lock when the holder dies (no stale lock files).
They are independent of the POSIX record locks SQLite uses on the same file on Linux.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from guard.core.errors import JournalError


class WriterLock:
    """Held until :meth:`release` (or the process exits)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, path: Path) -> WriterLock:
        """Lock ``path`` (an existing journal) or raise JOURNAL_BUSY naming the holder's role."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise JournalError(f"journal {path} cannot be opened: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JournalError(f"journal {path} is in use by another posguard process (a running daemon, replay, "
                               "compact or keys rotate); stop it first", code="JOURNAL_BUSY") from None
        return cls(fd, path)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
