"""One writer per journal: an advisory ``flock`` on the journal file, held from start to stop.

SQLite's own locks do not stop a second daemon: in WAL mode two connections may both write,
each with its own idea of the next seq (the second dies on ``UNIQUE constraint failed``, and its
reader loses its results). The daemon and the exclusive maintenance tools (``replay``, ``compact``,
``keys rotate``) therefore take this lock before they read or change anything; read-only tools
(``journal verify|show|export|anchor``, ``reconcile``) do not, so they still run beside the daemon.

``flock`` locks belong to the open file description and the kernel drops them when the holder
dies (no stale lock files); they are independent of the POSIX record locks SQLite uses on the same
file on Linux. Within one process the lock is re-entrant (counted per file): a tool the daemon
runs itself on its own journal (retention) does not lock the daemon out; other processes do.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from guard.core.errors import JournalError


_HELD: dict[tuple[int, int], list[int]] = {}  # (st_dev, st_ino) -> [fd, holders] of the locks this process holds


class WriterLock:
    """Held until :meth:`release` (or the process exits)."""

    def __init__(self, ident: tuple[int, int], path: Path) -> None:
        self._ident: tuple[int, int] | None = ident
        self.path = path

    @classmethod
    def acquire(cls, path: Path) -> WriterLock:
        """Lock ``path`` (an existing journal) or raise JOURNAL_BUSY."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise JournalError(f"journal {path} cannot be opened: {e.strerror or e}") from None
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        held = _HELD.get(ident)
        if held is not None:
            os.close(fd)
            held[1] += 1
            return cls(ident, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JournalError(f"journal {path} is in use by another posguard process (a running daemon, replay, "
                               "compact or keys rotate); stop it first", code="JOURNAL_BUSY") from None
        _HELD[ident] = [fd, 1]
        return cls(ident, path)

    @property
    def held(self) -> bool:
        return self._ident is not None

    def release(self) -> None:
        ident, self._ident = self._ident, None
        if ident is None:
            return
        held = _HELD.get(ident)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del _HELD[ident]
            os.close(held[0])
